"""Build the one compiled module, fastsmtp._parser.

Everything else is in pyproject.toml.  The build_ext options follow uvloop and
httptools: --cython-always regenerates the C file, --cython-annotate writes
the HTML annotation, --cython-directives passes directives (for example
"boundscheck=True,linetrace=True" for the debug build).
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext


class build_ext(_build_ext):
    user_options = _build_ext.user_options + [
        ("cython-always", None, "run cythonize() even if the .c file exists"),
        ("cython-annotate", None, "produce a colorized HTML version of the source"),
        ("cython-directives=", None, "Cython compiler directives"),
    ]
    boolean_options = _build_ext.boolean_options + ["cython-always", "cython-annotate"]

    def initialize_options(self) -> None:
        super().initialize_options()
        self.cython_always = False
        self.cython_annotate = False
        self.cython_directives = None

    def finalize_options(self) -> None:
        from Cython.Build import cythonize

        # Release defaults live here, not in the .pyx header: a header
        # directive would override --cython-directives and the debug build
        # would silently keep them off.
        directives = {"language_level": "3", "boundscheck": False, "wraparound": False}
        if self.cython_directives:
            for pair in self.cython_directives.split(","):
                key, _, value = pair.partition("=")
                directives[key.strip()] = value.strip() not in ("False", "false", "0")
        # setuptools' build_ext is Cython's when Cython is installed, and that
        # one reads cython_directives as a dict: hand it the parsed one.
        self.cython_directives = directives
        debug = bool(os.environ.get("FASTSMTP_DEBUG"))
        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            annotate=self.cython_annotate,
            force=self.cython_always,
            compile_time_env={"FASTSMTP_DEBUG": debug},
        )
        super().finalize_options()


setup(
    ext_modules=[
        Extension(
            "fastsmtp._parser",
            ["src/fastsmtp/_parser.pyx"],
            extra_compile_args=["-O2"],
        )
    ],
    package_dir={"": "src"},
    cmdclass={"build_ext": build_ext},
)
