"""Builds the Cython extensions of `pyserver_framecodec`; metadata is in pyproject.toml.

setuptools cannot declare C extensions in pyproject.toml alone (before 74), hence this file.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

# The frame codec, and the reply table that answers cached reads out of its buffer.
extensions = [
    Extension(
        f"pyserver_framecodec.{name}",
        [f"pyserver_framecodec/{name}.pyx"],
        # Appended after Python's own CFLAGS, so this -O2 is the one gcc applies.
        extra_compile_args=["-O2"],
    )
    for name in ("_codec", "_replies")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": 3},
    ),
)
