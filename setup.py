"""Build the C extensions of wsfleet.ipc; all other metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("wsfleet.ipc._atomic", ["ipc/_atomic.c"], extra_compile_args=["-O2"]),
        Extension("wsfleet.ipc._fastring", ["ipc/_fastring.c"], extra_compile_args=["-O2"]),
        Extension("wsfleet.ipc._inbox", ["ipc/_inbox.c"], extra_compile_args=["-O2"]),
    ],
)
