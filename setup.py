"""Build the one C extension; all other metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("wsfleet.ipc._atomic", ["ipc/_atomic.c"], extra_compile_args=["-O2"]),
    ],
)
