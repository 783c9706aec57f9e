"""Print, as JSON, the line tables of many code objects and the line the
interpreter itself gives each bytecode offset: the reference for
perfagent.python.linetable (run by every CPython the tests find).

Output: {"version": [3, X], "codes": [{"name", "firstlineno", "table" (hex),
"lines": [[addrq, line or null], ...]}, ...]}.
"""

import dis
import json
import sys
import types

MODULES = ("json.decoder", "json.encoder", "argparse", "inspect", "dis", "textwrap", "string",
           "tokenize", "ast", "enum")


def walk(code):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from walk(const)


def lines_38(code):
    starts = list(dis.findlinestarts(code))
    out = []
    j = -1
    for addr in range(0, len(code.co_code), 2):
        while j + 1 < len(starts) and starts[j + 1][0] <= addr:
            j += 1
        out.append([addr, starts[j][1] if j >= 0 else code.co_firstlineno])
    return out


def lines_310(code):
    out = []
    for start, end, line in code.co_lines():
        for addr in range(start, end, 2):
            out.append([addr, line])
    return out


def lines_311(code):
    return [[2 * i, pos[0]] for i, pos in enumerate(code.co_positions())]


def main():
    import importlib
    v = sys.version_info[:2]
    if v < (3, 10):
        table_of, lines_of = (lambda c: c.co_lnotab), lines_38
    elif v == (3, 10):
        table_of, lines_of = (lambda c: c.co_linetable), lines_310
    else:
        table_of, lines_of = (lambda c: c.co_linetable), lines_311
    codes = []
    for name in MODULES:
        mod = importlib.import_module(name)
        with open(mod.__file__, encoding="utf-8") as f:
            top = compile(f.read(), mod.__file__, "exec")
        for code in walk(top):
            codes.append({"name": code.co_name, "firstlineno": code.co_firstlineno,
                          "table": table_of(code).hex(), "lines": lines_of(code)})
    json.dump({"version": list(v), "codes": codes}, sys.stdout)


if __name__ == "__main__":
    main()
