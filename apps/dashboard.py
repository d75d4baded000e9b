"""The served trace dashboard.

    panel serve apps/dashboard.py --args PATH     # PATH: one trace store or a directory of them
    workbench serve PATH                          # the same, listening on 127.0.0.1

Add ``?trace=NAME`` to the URL to open a trace of the directory by name.
"""
import os
import sys

from workbench.views.dashboard import Dashboard

root = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("WORKBENCH_TRACES", "runs")
Dashboard(root).template().servable()
