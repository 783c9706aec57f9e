"""The Flask service tests/test_web_app.py profiles under gunicorn: two
routes whose time is pure Python (known functions, known shares)."""

from flask import Flask

app = Flask(__name__)


def count_primes(limit):
    found = 0
    for n in range(2, limit):
        for d in range(2, int(n ** 0.5) + 1):
            if n % d == 0:
                break
        else:
            found += 1
    return found


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


@app.route("/primes")
def primes_route():
    return str(count_primes(30000))


@app.route("/fib")
def fib_route():
    return str(fib(20))
