"""Running the pack outside ComfyUI's own start-up, for the tests, the benchmarks and the demo.

A real ComfyUI tree from the package registry (:mod:`.comfyui`), the pack imported as ComfyUI imports it
(:mod:`.pack`), ComfyUI imported in-process with nodes run as its executor runs them (:mod:`.inprocess`), a
headless server driven over HTTP (:mod:`.server`), UI-to-API workflow conversion (:mod:`.workflow`), tiny
random-weight models in the real checkpoint formats (:mod:`.tiny_models`) and interrupting a running prompt
(:mod:`.interrupt`). Never imported by the pack itself; ``tests/`` and ``scripts/`` both import it with the
repository root on ``sys.path`` (pytest's ``pythonpath``, one line at the top of each script).
"""
