/* Placeholder of afunix's compiled core (the real one replaces this file): a module
 * afunix._ccore with ABI = 1 and nothing else. */
#define PY_SSIZE_T_CLEAN
#define Py_LIMITED_API 0x030B0000
#include <Python.h>

static int
ccore_exec(PyObject *module)
{
    return PyModule_AddIntConstant(module, "ABI", 1);
}

static PyModuleDef_Slot ccore_slots[] = {
    {Py_mod_exec, (void *)ccore_exec},
    {0, NULL},
};

static struct PyModuleDef ccore_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "afunix._ccore",
    .m_doc = "afunix's compiled core (placeholder).",
    .m_size = 0,
    .m_slots = ccore_slots,
};

PyMODINIT_FUNC
PyInit__ccore(void)
{
    return PyModuleDef_Init(&ccore_module);
}
