"""Thin entry for running the app from a checkout: ``streamlit run app.py -- --home H``.

The UI lives in the package (:mod:`atlasq.webapp`) so that an installed atlasq runs it too
(``atlasq app``). Streamlit re-executes this file on every interaction, so the page script is run
afresh each time rather than imported once.
"""

import runpy

runpy.run_module("atlasq.webapp", run_name="__main__")
