"""``python -m trustmesh`` runs the command line.

``python -m trustmesh sample NAME …`` — how the local mesh starts each stand-in for an
Istio sample image — skips loading the command line when its arguments are plain ones
(see :mod:`trustmesh.samples.run`): a mesh starts one such process per pod.
"""

import sys

if sys.argv[1:2] == ["sample"]:
    from trustmesh.samples.run import fast_invocation, serve

    invocation = fast_invocation(sys.argv[2:])
    if invocation is not None:
        sys.exit(serve(invocation))

from trustmesh.cli.main import run  # after the fast path, on purpose

run()
