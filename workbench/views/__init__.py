"""Panel/Bokeh views of a trace, shared by the served dashboard and notebook widgets.

Views read traces only through ``workbench.trace`` (never the runtime). Each view is a
``pn.viewable.Viewer`` over one shared ``TraceState``.
"""
