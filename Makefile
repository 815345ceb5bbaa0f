# Build, test, and check the compiled parser for memory errors.
#
#   make build       install editable (pip; the extension in release form)
#   make release     rebuild only the extension, in place, release form
#   make debug       rebuild it in place with FASTSMTP_DEBUG counters and checks
#   make test        the suite on the compiled parser, then the parser and
#                    session tests again on the pure-Python twin
#   make test-debug  debug build, the whole suite once, then back to release
#   make valgrind    the parser tests and a fuzz loop under valgrind memcheck
#   make asan        the same under AddressSanitizer (a separate build in build/asan)
#   make fuzz        one minute of each atheris harness (fuzz/README.md: longer runs)
#
# PYTHON is the interpreter of the environment fastsmtp is installed in:
#   make test PYTHON=/path/to/venv/bin/python

PYTHON ?= $(firstword $(wildcard .venv/bin/python) python3)

PARSER_TESTS := tests/test_parser.py tests/test_parser_properties.py
# What FASTSMTP_PUREPYTHON=1 changes: the parser, and the session on top of it.
TWIN_TESTS := $(PARSER_TESTS) tests/test_session.py tests/test_session_statemachine.py tests/test_fuzz_smoke.py
# The generated C file is ignored by git and reused when it is newer than the
# .pyx; every build here regenerates it, so that a debug C file never ends up
# in a release build or the other way round.
CYTHONIZE := --force --cython-always
# Building in place rewrites the .so file itself, and a process that has the
# old one mapped (a test run, a fuzzer, a server) dies of SIGBUS when the file
# under it is truncated: unlink it first, so the new build is a new file.
UNLINK_EXT := rm -f src/fastsmtp/_parser.*.so

.PHONY: build build-deps release debug test test-debug valgrind asan fuzz

build:
	rm -f src/fastsmtp/_parser.c
	$(UNLINK_EXT)
	$(PYTHON) -m pip install -e .

# setup.py run directly uses the environment's setuptools and Cython, and the
# setuptools that a Python 3.11 venv starts with (65) cannot read this
# pyproject.toml (PEP 639 license string): bring in what [build-system] asks for.
build-deps:
	$(PYTHON) -m pip install -q 'setuptools>=77' 'Cython>=3.0,<4'

release: build-deps
	$(UNLINK_EXT)
	$(PYTHON) setup.py -q build_ext --inplace $(CYTHONIZE)
	$(PYTHON) -c "import fastsmtp._parser as p; assert not p.DEBUG, 'still a debug build'"

# STYLE.md: debug builds add the debug counters, annotate, and ask Cython for
# bounds and wraparound checks (setup.py sets them off for release builds;
# the .pyx header does not, so these directives take effect).  The module
# mostly indexes raw char pointers, which Cython never checks: memory errors
# are valgrind's and ASan's job, see those targets.
debug: build-deps
	$(UNLINK_EXT)
	FASTSMTP_DEBUG=1 $(PYTHON) setup.py -q build_ext --inplace $(CYTHONIZE) --cython-annotate \
		--cython-directives=boundscheck=True,wraparound=True
	$(PYTHON) -c "import fastsmtp._parser as p; assert p.DEBUG, 'not a debug build'"

test:
	$(PYTHON) -m pytest -q
	FASTSMTP_PUREPYTHON=1 $(PYTHON) -m pytest -q $(TWIN_TESTS)

# The debug extension replaces the release one in the source tree, which
# every other user of this checkout imports: put the release build back
# whatever the result.
test-debug: debug
	$(PYTHON) -m pytest -q; status=$$?; \
	$(MAKE) --no-print-directory release PYTHON=$(PYTHON); exit $$status

# Memcheck on the installed (release) extension.  PYTHONMALLOC=malloc makes
# every Python object a malloc block of its own, so an overrun of a bytes
# object the parser fills is an invalid write.  Only addressability errors
# count (invalid read/write/free): --undef-value-errors=no, because CPython
# 3.11 itself reads uninitialised memory in int.from_bytes (on every .pyc
# it loads), and that taint spreads through the interpreter; an
# uninitialised octet the parser returned would show up as a difference
# from the twin in the same run.  fuzz/valgrind.supp lists the rest.
# pytest-timeout is off: everything runs some 30 times slower.
VALGRIND := PYTHONMALLOC=malloc valgrind -q --error-exitcode=1 --leak-check=no \
	--undef-value-errors=no --suppressions=fuzz/valgrind.supp
valgrind:
	$(PYTHON) -c "import fastsmtp._parser"
	$(VALGRIND) $(PYTHON) -m pytest -q -p no:cacheprovider --timeout=0 $(PARSER_TESTS)
	$(VALGRIND) $(PYTHON) fuzz/fuzz_parser.py --plain fuzz/corpus -runs=10000 -seed=1

# AddressSanitizer: gcc's libasan preloaded into the ordinary CPython (which
# is not instrumented itself; PYTHONMALLOC=malloc again gives every object
# redzones).  The instrumented extension is built into build/asan with a copy
# of the package and put first on PYTHONPATH, never in src/: an ASan
# extension cannot even be imported without the preload, and others import
# src/ meanwhile.  Leak detection is off: CPython keeps memory to exit.
ASAN_LIB = $(shell gcc -print-file-name=libasan.so)
ASAN_RUN = LD_PRELOAD=$(ASAN_LIB) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	PYTHONMALLOC=malloc PYTHONPATH=build/asan
asan: build-deps
	rm -rf build/asan && mkdir -p build/asan/fastsmtp
	cp src/fastsmtp/*.py src/fastsmtp/py.typed build/asan/fastsmtp/
	CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g" LDFLAGS="-fsanitize=address" \
		$(PYTHON) setup.py -q build_ext --build-lib build/asan --build-temp build/asan-tmp $(CYTHONIZE)
	$(ASAN_RUN) $(PYTHON) -c "import fastsmtp._parser as p; assert '/build/asan/' in p.__file__, p.__file__"
	$(ASAN_RUN) $(PYTHON) -m pytest -q -p no:cacheprovider $(PARSER_TESTS)
	$(ASAN_RUN) $(PYTHON) fuzz/fuzz_parser.py --plain fuzz/corpus -runs=50000 -seed=1

# New inputs go to build/fuzz-*, never into the seed corpus.
fuzz:
	mkdir -p build/fuzz-session build/fuzz-parser
	$(PYTHON) fuzz/fuzz_session.py build/fuzz-session fuzz/corpus -dict=fuzz/smtp.dict -max_total_time=60 -artifact_prefix=build/
	$(PYTHON) fuzz/fuzz_parser.py build/fuzz-parser fuzz/corpus -dict=fuzz/smtp.dict -max_total_time=60 -artifact_prefix=build/
