/*
 * wsfleet.ipc._atomic: aligned 64-bit words of a shared buffer, loaded and
 * stored with explicit C11 memory order (GCC/Clang __atomic builtins):
 * AtomicWord for one word, AtomicWords for a table of them.
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

/*
 * AtomicWords(buffer): the same operations on any word of a buffer of 64-bit
 * words, plus a fetch-and-add and the lookup of an open-addressing table.  For
 * tables too large for one Python object a word (the per-address connection
 * counts: 131,072 words per shard); indexes are checked against the buffer on
 * every call.
 */
typedef struct {
    PyObject_HEAD
    Py_buffer view;
    uint64_t *words; /* NULL once closed */
    Py_ssize_t count;
} Words;

static int
Words_init(Words *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", NULL};
    PyObject *buffer;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &buffer))
        return -1;
    if (self->words != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "AtomicWords is already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (self->view.len % 8 != 0 || ((uintptr_t)self->view.buf & 7) != 0) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError,
                        "AtomicWords needs a writable, 8-byte aligned buffer of whole words");
        return -1;
    }
    self->words = (uint64_t *)self->view.buf;
    self->count = self->view.len / 8;
    return 0;
}

static void
Words_release(Words *self)
{
    if (self->words != NULL) {
        self->words = NULL;
        PyBuffer_Release(&self->view);
    }
}

static void
Words_dealloc(Words *self)
{
    Words_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The word at ``arg`` (an index), or NULL with an exception set. */
static uint64_t *
Words_at(Words *self, PyObject *arg)
{
    if (self->words == NULL) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed AtomicWords");
        return NULL;
    }
    Py_ssize_t index = PyLong_AsSsize_t(arg);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    if (index < 0 || index >= self->count) {
        PyErr_Format(PyExc_IndexError, "word %zd of %zd", index, self->count);
        return NULL;
    }
    return self->words + index;
}

static PyObject *
Words_load(Words *self, PyObject *arg)
{
    uint64_t *word = Words_at(self, arg);
    if (word == NULL)
        return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(word, __ATOMIC_SEQ_CST));
}

static PyObject *
Words_add(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add(index, delta) takes two arguments");
        return NULL;
    }
    uint64_t *word = Words_at(self, args[0]);
    if (word == NULL)
        return NULL;
    long long delta = PyLong_AsLongLong(args[1]);
    if (delta == -1 && PyErr_Occurred())
        return NULL;
    /* Two's complement: adding (uint64_t)-1 subtracts one. */
    uint64_t value = __atomic_add_fetch(word, (uint64_t)delta, __ATOMIC_SEQ_CST);
    return PyLong_FromUnsignedLongLong(value);
}

static PyObject *
Words_store(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "store(index, value) takes two arguments");
        return NULL;
    }
    uint64_t *word = Words_at(self, args[0]);
    uint64_t value;
    if (word == NULL || Word_value(args[1], &value) < 0)
        return NULL;
    __atomic_store_n(word, value, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/*
 * find(base, slots, key): look ``key`` up in the open-addressing table of ``slots``
 * (a power of two) entries of two words, [key, count], from word ``base``: linear
 * probing from ``key % slots`` to the first empty entry (key 0).  Returns (the entry
 * holding ``key`` or -1, the first entry of the probe whose count is 0 or -1): where
 * its writer puts a key it lacks.  Every load sequentially consistent.
 */
static PyObject *
Words_find(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "find(base, slots, key) takes three arguments");
        return NULL;
    }
    if (self->words == NULL) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed AtomicWords");
        return NULL;
    }
    Py_ssize_t base = PyLong_AsSsize_t(args[0]);
    Py_ssize_t slots = PyLong_AsSsize_t(args[1]);
    uint64_t key;
    if (PyErr_Occurred() || Word_value(args[2], &key) < 0)
        return NULL;
    if (key == 0 || slots < 1 || (slots & (slots - 1)) != 0 || base < 0
        || base > self->count - 2 * slots) {
        PyErr_SetString(PyExc_ValueError, "find: a nonzero key, a power of two of slots inside");
        return NULL;
    }
    uint64_t *table = self->words + base;
    Py_ssize_t mask = slots - 1, free = -1, found = -1;
    Py_ssize_t i = (Py_ssize_t)(key & (uint64_t)mask);
    for (Py_ssize_t probes = 0; probes < slots; probes++, i = (i + 1) & mask) {
        uint64_t held = __atomic_load_n(table + 2 * i, __ATOMIC_SEQ_CST);
        if (held == key) {
            found = i;
            break;
        }
        if (free < 0 && __atomic_load_n(table + 2 * i + 1, __ATOMIC_SEQ_CST) == 0)
            free = i;
        if (held == 0)
            break;
    }
    return Py_BuildValue("nn", found, free);
}

/* The entry of ``key`` in the table of ``slots`` entries at ``table``, or -1 (find's probe). */
static Py_ssize_t
table_lookup(uint64_t *table, Py_ssize_t slots, uint64_t key)
{
    Py_ssize_t mask = slots - 1;
    Py_ssize_t i = (Py_ssize_t)(key & (uint64_t)mask);
    for (Py_ssize_t probes = 0; probes < slots; probes++, i = (i + 1) & mask) {
        uint64_t held = __atomic_load_n(table + 2 * i, __ATOMIC_SEQ_CST);
        if (held == key)
            return i;
        if (held == 0)
            return -1;
    }
    return -1;
}

/*
 * total(base, stride, tables, slots, key): the sum of ``key``'s counts over ``tables``
 * tables like find's, the first at word ``base``, each ``stride`` words after the last.
 */
static PyObject *
Words_total(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "total(base, stride, tables, slots, key) takes five arguments");
        return NULL;
    }
    if (self->words == NULL) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed AtomicWords");
        return NULL;
    }
    Py_ssize_t base = PyLong_AsSsize_t(args[0]);
    Py_ssize_t stride = PyLong_AsSsize_t(args[1]);
    Py_ssize_t tables = PyLong_AsSsize_t(args[2]);
    Py_ssize_t slots = PyLong_AsSsize_t(args[3]);
    uint64_t key;
    if (PyErr_Occurred() || Word_value(args[4], &key) < 0)
        return NULL;
    if (key == 0 || slots < 1 || (slots & (slots - 1)) != 0 || base < 0 || tables < 0
        || stride < 2 * slots
        || (tables > 0 && base + (tables - 1) * stride + 2 * slots > self->count)) {
        PyErr_SetString(PyExc_ValueError, "total: a nonzero key, tables inside the buffer");
        return NULL;
    }
    uint64_t sum = 0;
    for (Py_ssize_t t = 0; t < tables; t++) {
        uint64_t *table = self->words + base + t * stride;
        Py_ssize_t entry = table_lookup(table, slots, key);
        if (entry >= 0)
            sum += __atomic_load_n(table + 2 * entry + 1, __ATOMIC_SEQ_CST);
    }
    return PyLong_FromUnsignedLongLong(sum);
}

static PyObject *
Words_clear(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "clear(start, count) takes two arguments");
        return NULL;
    }
    if (self->words == NULL) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed AtomicWords");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[0]);
    Py_ssize_t count = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred())
        return NULL;
    if (start < 0 || count < 0 || start > self->count - count) {
        PyErr_Format(PyExc_IndexError, "words %zd..%zd of %zd", start, start + count, self->count);
        return NULL;
    }
    for (Py_ssize_t i = start; i < start + count; i++)
        __atomic_store_n(self->words + i, 0, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *
Words_close(Words *self, PyObject *Py_UNUSED(ignored))
{
    Words_release(self);
    Py_RETURN_NONE;
}

static Py_ssize_t
Words_len(Words *self)
{
    return self->words == NULL ? 0 : self->count;
}

static PyMethodDef Words_methods[] = {
    {"load", (PyCFunction)Words_load, METH_O, "load(index): sequentially consistent read."},
    {"add", (PyCFunction)(void (*)(void))Words_add, METH_FASTCALL,
     "add(index, delta): sequentially consistent fetch-and-add; returns the new value."},
    {"store", (PyCFunction)(void (*)(void))Words_store, METH_FASTCALL,
     "store(index, value): sequentially consistent write."},
    {"find", (PyCFunction)(void (*)(void))Words_find, METH_FASTCALL,
     "find(base, slots, key): (entry holding key or -1, first entry of count 0 or -1) of "
     "an open-addressing table of [key, count] entries."},
    {"total", (PyCFunction)(void (*)(void))Words_total, METH_FASTCALL,
     "total(base, stride, tables, slots, key): the sum of key's counts over that many tables."},
    {"clear", (PyCFunction)(void (*)(void))Words_clear, METH_FASTCALL,
     "clear(start, count): store 0 in ``count`` words from ``start``."},
    {"close", (PyCFunction)Words_close, METH_NOARGS,
     "Release the buffer export so the memory can be unmapped."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Words_sequence = {
    .sq_length = (lenfunc)Words_len,
};

static PyTypeObject WordsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wsfleet.ipc._atomic.AtomicWords",
    .tp_doc = PyDoc_STR("AtomicWords(buffer): every aligned 64-bit word of a shared buffer."),
    .tp_basicsize = sizeof(Words),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Words_init,
    .tp_dealloc = (destructor)Words_dealloc,
    .tp_methods = Words_methods,
    .tp_as_sequence = &Words_sequence,
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
    if (PyType_Ready(&WordType) < 0 || PyType_Ready(&WordsType) < 0)
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
    Py_INCREF(&WordsType);
    if (PyModule_AddObject(module, "AtomicWords", (PyObject *)&WordsType) < 0) {
        Py_DECREF(&WordsType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
