/*
 * wsfleet.ipc._atomic: one aligned 64-bit word of a shared buffer, loaded and
 * stored with explicit C11 memory order (GCC/Clang __atomic builtins).
 *
 * Why C and not the `atomics` package: its Python wrapper costs ~5.5 us per
 * operation (measured here), a ring touches 3-5 words per batch, and that
 * made small batches slower than the data copies themselves.  These are the
 * same instructions (x86-64: mov / xchg; aarch64: ldar / stlr) behind a
 * METH_NOARGS / METH_O call of ~40 ns.
 *
 * The Word keeps a buffer export of the memory for its whole life, so the
 * mapping cannot be closed under it; close() releases the export.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    uint64_t *word; /* NULL once closed */
} Word;

static int
Word_init(Word *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", NULL};
    PyObject *buffer;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &buffer))
        return -1;
    if (self->word != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "AtomicWord is already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (self->view.len != 8 || ((uintptr_t)self->view.buf & 7) != 0) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError,
                        "AtomicWord needs a writable, 8-byte aligned buffer of exactly 8 bytes");
        return -1;
    }
    self->word = (uint64_t *)self->view.buf;
    return 0;
}

static void
Word_release(Word *self)
{
    if (self->word != NULL) {
        self->word = NULL;
        PyBuffer_Release(&self->view);
    }
}

static void
Word_dealloc(Word *self)
{
    Word_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Word_check(Word *self)
{
    if (self->word == NULL) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed AtomicWord");
        return -1;
    }
    return 0;
}

static PyObject *
Word_load_acquire(Word *self, PyObject *Py_UNUSED(ignored))
{
    if (Word_check(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(self->word, __ATOMIC_ACQUIRE));
}

static PyObject *
Word_load(Word *self, PyObject *Py_UNUSED(ignored))
{
    if (Word_check(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(self->word, __ATOMIC_SEQ_CST));
}

static int
Word_value(PyObject *arg, uint64_t *value)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(arg);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *value = (uint64_t)v;
    return 0;
}

static PyObject *
Word_store_release(Word *self, PyObject *arg)
{
    uint64_t value;
    if (Word_check(self) < 0 || Word_value(arg, &value) < 0)
        return NULL;
    __atomic_store_n(self->word, value, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *
Word_store(Word *self, PyObject *arg)
{
    uint64_t value;
    if (Word_check(self) < 0 || Word_value(arg, &value) < 0)
        return NULL;
    __atomic_store_n(self->word, value, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *
Word_close(Word *self, PyObject *Py_UNUSED(ignored))
{
    Word_release(self);
    Py_RETURN_NONE;
}

static PyMethodDef Word_methods[] = {
    {"load_acquire", (PyCFunction)Word_load_acquire, METH_NOARGS,
     "Read the word; later reads see everything the writer wrote before its release store."},
    {"store_release", (PyCFunction)Word_store_release, METH_O,
     "Write the word after every earlier write of this thread is visible."},
    {"load", (PyCFunction)Word_load, METH_NOARGS, "Sequentially consistent read."},
    {"store", (PyCFunction)Word_store, METH_O,
     "Sequentially consistent write (no later load passes it)."},
    {"close", (PyCFunction)Word_close, METH_NOARGS,
     "Release the buffer export so the memory can be unmapped."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WordType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wsfleet.ipc._atomic.AtomicWord",
    .tp_doc = PyDoc_STR("AtomicWord(buffer): an aligned 64-bit word of shared memory."),
    .tp_basicsize = sizeof(Word),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Word_init,
    .tp_dealloc = (destructor)Word_dealloc,
    .tp_methods = Word_methods,
};

static struct PyModuleDef atomic_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wsfleet.ipc._atomic",
    .m_doc = "Acquire/release and sequentially consistent access to 64-bit words of shared memory.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__atomic(void)
{
    if (PyType_Ready(&WordType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&atomic_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&WordType);
    if (PyModule_AddObject(module, "AtomicWord", (PyObject *)&WordType) < 0) {
        Py_DECREF(&WordType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
