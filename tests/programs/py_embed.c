/* A native program that runs Python, which calls back into C, which calls
 * Python again: main > c_outer > (interpreter) > <module> > f > native_cb >
 * native_middle > (interpreter) > g, g spinning.  The merged stack must put
 * each Python frame exactly there among the native frames.
 *
 * Built against a CPython's headers and shared libpython by the test.
 * usage: py_embed SCRIPT
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

__attribute__((noinline)) PyObject *native_middle(PyObject *fn)
{
    PyObject *r = PyObject_CallObject(fn, NULL);
    __asm__ volatile("" ::: "memory");   /* not a tail call */
    return r;
}

static PyObject *native_cb(PyObject *self, PyObject *args)
{
    PyObject *fn;
    if (!PyArg_ParseTuple(args, "O", &fn))
        return NULL;
    PyObject *r = native_middle(fn);
    __asm__ volatile("" ::: "memory");
    return r;
}

static PyMethodDef methods[] = {
    {"native_cb", native_cb, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "embedmod", NULL, -1, methods};

static PyObject *init_embedmod(void) { return PyModule_Create(&module); }

__attribute__((noinline)) int c_outer(FILE *f, const char *path)
{
    int rc = PyRun_SimpleFile(f, path);
    __asm__ volatile("" ::: "memory");
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    PyImport_AppendInittab("embedmod", init_embedmod);
    Py_Initialize();
    FILE *f = fopen(argv[1], "r");
    if (!f)
        return 3;
    int rc = c_outer(f, argv[1]);
    fclose(f);
    Py_Finalize();
    return rc;
}
