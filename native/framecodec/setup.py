"""Builds the Cython extension `pyserver_framecodec._codec`; metadata is in pyproject.toml.

setuptools cannot declare C extensions in pyproject.toml alone (before 74), hence this file.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extension = Extension(
    "pyserver_framecodec._codec",
    ["pyserver_framecodec/_codec.pyx"],
    # Appended after Python's own CFLAGS, so this -O2 is the one gcc applies.
    extra_compile_args=["-O2"],
)

setup(
    ext_modules=cythonize(
        [extension],
        compiler_directives={"language_level": 3},
    ),
)
