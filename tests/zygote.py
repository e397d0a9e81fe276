"""A Python that has already imported the harness and forks one child per command.

Every `python launch.py ...` or `python -m train.label ...` spends about 8 s of its time importing
torch, transformers, datasets and Hydra before it does anything; the suite runs about 90 of them.
This server pays that once per test worker. For each request it forks: the child takes the
request's working dir, environment, argv and output files, then runs the script or module as
`__main__` exactly as `python` would (runpy), and leaves through the interpreter's normal exit, so
an uncaught exception prints its traceback and exits 1, sys.exit codes pass through, atexit handlers
and thread joins run, and a signal ends it as it would end a fresh process. The parent reports the
child's pid, then its exit code.

Only environment variables that the harness reads while it runs may differ from the server's own
(see conftest.ZYGOTE_ENV); anything read at import time (HF_HUB_OFFLINE, HF_ENDPOINT, PYTHON*)
needs a fresh interpreter, and conftest starts one. `REWARD_TESTS_FRESH=1` turns the server off.

Requests name a script, `-m module` or `-c code`, as `python` takes them (run_as_python, which
conftest.heavy_imports also uses in a fresh interpreter; importing this module starts no server).
Protocol: one JSON request per line on stdin; one JSON line {"pid"} then one {"returncode"} back.
"""
import json
import os
import runpy
import sys
import types


def run_as_python(argv: list):
    """`python ARGV` in this interpreter: a script, `-m module` or `-c code`, run as `__main__`."""
    sys.argv = list(argv)
    if sys.argv[0] == "-m":
        sys.argv.pop(0)
        sys.modules.pop(sys.argv[0], None)  # imported above as a module, not yet as __main__: as `python -m` finds it
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    elif sys.argv[0] == "-c":
        code = sys.argv.pop(1)
        sys.modules["__main__"] = main = types.ModuleType("__main__")
        exec(compile(code, "<string>", "exec"), main.__dict__)
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
        runpy.run_path(sys.argv[0], run_name="__main__")


def serve(replies):
    """Returns the request in a child; the server itself never returns."""
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()  # nothing of the server's own output may reach a child's files
        pid = os.fork()
        if pid == 0:
            replies.close()
            return request
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()
    sys.exit(0)


if __name__ == "__main__":
    # The repo root, as `python launch.py` and `python -m train.label` run there have it.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import torch

    # What a run imports once it is past its argument checks (launch.py and train.label check first
    # and import these after, so importing launch.py or train.label alone would load little).
    import train.build  # noqa: F401
    import train.labeling.scoring  # noqa: F401

    request = serve(os.fdopen(os.dup(1), "w"))  # the children get fd 1 for their own stdout
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                           (2, request["stderr"], os.O_WRONLY)):
        os.dup2(os.open(path, mode), fd)
    if "OMP_NUM_THREADS" in os.environ:  # torch read it once, when the server imported it
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    run_as_python(request["argv"])
