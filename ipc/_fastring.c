/*
 * wsfleet.ipc._fastring: the common case of the ring's batch copy loops in C.
 *
 * ring.py walks records in Python; with small records that loop is the
 * ring's whole cost (about 0.2 us to write and 0.35 us to read a record).
 * These two functions do exactly the same walk for the common records and
 * stop, handing back to ring.py, at anything else: a record that needs a
 * wrap, a chunk or more space than is free (writing), a chunked message
 * (reading), or a value ring.py must refuse with its own error.  They take
 * no lock and touch no shared index: ring.py loads and publishes the indexes
 * with the atomics of _atomic.c, before and after these calls.
 *
 * Layout (see ring.py): records from DATA_OFF, 16-byte header
 * <u32 length, i32 peer, u16 kind, u16 flags, u32 total>, payload, padded
 * to 8; kind 0 is a pad to the end; fewer than 16 bytes before the end are
 * skipped.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define DATA_OFF 512
#define HEADER 16
#define PAD_KIND 0
#define MORE 0x8000

/* Stop reasons returned to ring.py. */
#define STOP_DONE 0      /* everything asked for was done */
#define STOP_SLOW 1      /* the next record needs ring.py's slow path */
#define STOP_CORRUPT 2   /* a header runs past the published data */

static inline uint64_t
aligned(uint64_t n)
{
    return (n + 7) & ~(uint64_t)7;
}

/* pop_records(buffer, capacity, tail, head, limit) -> (records, tail, stop) */
static PyObject *
pop_records(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "pop_records(buffer, capacity, tail, head, limit)");
        return NULL;
    }
    uint64_t capacity = PyLong_AsUnsignedLongLong(args[1]);
    uint64_t tail = PyLong_AsUnsignedLongLong(args[2]);
    uint64_t head = PyLong_AsUnsignedLongLong(args[3]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if ((uint64_t)view.len < DATA_OFF + capacity) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "buffer smaller than the ring");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)view.buf + DATA_OFF;
    uint64_t mask = capacity - 1;
    PyObject *records = PyList_New(0);
    if (records == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    int stop = STOP_DONE;
    while (tail < head && PyList_GET_SIZE(records) < limit) {
        uint64_t pos = tail & mask;
        uint64_t contiguous = capacity - pos;
        if (contiguous < HEADER) {
            tail += contiguous;
            continue;
        }
        const unsigned char *record = data + pos;
        uint32_t length;
        int32_t peer;
        uint16_t kind, flags;
        memcpy(&length, record, 4);
        memcpy(&peer, record + 4, 4);
        memcpy(&kind, record + 8, 2);
        memcpy(&flags, record + 10, 2);
        if (kind == PAD_KIND) {
            tail += contiguous;
            continue;
        }
        uint64_t need = aligned(HEADER + (uint64_t)length);
        if (need > contiguous || tail + need > head) {
            stop = STOP_CORRUPT;
            break;
        }
        if (flags & MORE) {
            stop = STOP_SLOW;
            break;
        }
        PyObject *item = Py_BuildValue(
            "(iiiy#)", (int)kind, (int)peer, (int)flags, (const char *)(record + HEADER),
            (Py_ssize_t)length);
        if (item == NULL || PyList_Append(records, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(records);
            PyBuffer_Release(&view);
            return NULL;
        }
        Py_DECREF(item);
        tail += need;
    }
    PyBuffer_Release(&view);
    PyObject *result = Py_BuildValue("(NKi)", records, (unsigned long long)tail, stop);
    return result;
}

/*
 * push_records(buffer, capacity, head, tail, records, start, max_message) -> (index, head)
 * Writes records[start:] while each fits whole before the end and in the free
 * space; returns the index of the first record it did not write.
 */
static PyObject *
push_records(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "push_records(buffer, capacity, head, tail, records, start, max_message)");
        return NULL;
    }
    uint64_t capacity = PyLong_AsUnsignedLongLong(args[1]);
    uint64_t head = PyLong_AsUnsignedLongLong(args[2]);
    uint64_t tail = PyLong_AsUnsignedLongLong(args[3]);
    PyObject *records = args[4];
    Py_ssize_t index = PyLong_AsSsize_t(args[5]);
    Py_ssize_t max_message = PyLong_AsSsize_t(args[6]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyList_Check(records) && !PyTuple_Check(records))
        return Py_BuildValue("(nK)", index, (unsigned long long)head);
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    if ((uint64_t)view.len < DATA_OFF + capacity) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "buffer smaller than the ring");
        return NULL;
    }
    unsigned char *data = (unsigned char *)view.buf + DATA_OFF;
    uint64_t mask = capacity - 1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(records);
    for (; index < count; index++) {
        PyObject *record = PySequence_Fast_GET_ITEM(records, index);
        if (!PyTuple_Check(record) || PyTuple_GET_SIZE(record) != 4)
            break;
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(record, 0));
        long peer = PyLong_AsLong(PyTuple_GET_ITEM(record, 1));
        long flags = PyLong_AsLong(PyTuple_GET_ITEM(record, 2));
        if (PyErr_Occurred()) {
            PyErr_Clear();
            break; /* ring.py raises the proper error */
        }
        if (kind <= 0 || kind > 0xFFFF || flags < 0 || flags >= MORE || peer < INT32_MIN
            || peer > INT32_MAX)
            break;
        PyObject *payload = PyTuple_GET_ITEM(record, 3);
        const char *bytes;
        Py_ssize_t size;
        Py_buffer payload_view;
        int has_view = 0;
        if (PyBytes_CheckExact(payload)) {
            bytes = PyBytes_AS_STRING(payload);
            size = PyBytes_GET_SIZE(payload);
        }
        else {
            if (PyObject_GetBuffer(payload, &payload_view, PyBUF_SIMPLE) < 0) {
                PyErr_Clear();
                break;
            }
            has_view = 1;
            bytes = (const char *)payload_view.buf;
            size = payload_view.len;
        }
        uint64_t need = aligned(HEADER + (uint64_t)size);
        uint64_t pos = head & mask;
        if (size > max_message || need > capacity - pos || need > capacity - (head - tail)) {
            if (has_view)
                PyBuffer_Release(&payload_view);
            break; /* too large, a wrap, or not enough space: ring.py's slow path */
        }
        unsigned char *out = data + pos;
        uint32_t length = (uint32_t)size, total = (uint32_t)size;
        int32_t peer32 = (int32_t)peer;
        uint16_t kind16 = (uint16_t)kind, flags16 = (uint16_t)flags;
        memcpy(out, &length, 4);
        memcpy(out + 4, &peer32, 4);
        memcpy(out + 8, &kind16, 2);
        memcpy(out + 10, &flags16, 2);
        memcpy(out + 12, &total, 4);
        memcpy(out + HEADER, bytes, (size_t)size);
        if (has_view)
            PyBuffer_Release(&payload_view);
        head += need;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nK)", index, (unsigned long long)head);
}

static PyMethodDef methods[] = {
    {"pop_records", (PyCFunction)(void (*)(void))pop_records, METH_FASTCALL,
     "pop_records(buffer, capacity, tail, head, limit) -> (records, tail, stop)"},
    {"push_records", (PyCFunction)(void (*)(void))push_records, METH_FASTCALL,
     "push_records(buffer, capacity, head, tail, records, start, max_message) -> (index, head)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastring_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wsfleet.ipc._fastring",
    .m_doc = "The common case of the ring's batch copy loops (see ring.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__fastring(void)
{
    PyObject *module = PyModule_Create(&fastring_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "STOP_DONE", STOP_DONE) < 0
        || PyModule_AddIntConstant(module, "STOP_SLOW", STOP_SLOW) < 0
        || PyModule_AddIntConstant(module, "STOP_CORRUPT", STOP_CORRUPT) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
