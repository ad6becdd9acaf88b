"""Code shared by the test modules (imported as ``helpers.<module>``; ``tests/conftest.py`` keeps only fixtures
and pytest settings).

pytest puts ``tests/`` on ``sys.path`` (rootdir-relative "prepend" imports: ``tests/`` has no ``__init__.py``), so
``from helpers.tolerances import ...`` works from the repository root, in a fresh clone and under pytest-xdist;
processes spawned by ``helpers.distributed.spawn_workers`` inherit that ``sys.path``.

    micro        MICRO, the micro-sized world + model config overrides of the fast end-to-end tests
    tolerances   per-dtype tolerance tables and ``assert_close_to_float64`` (the float64-reference comparison)
    distributed  the multi-process (gloo, CPU) harness: spawn workers, record per-check verdicts, assert them
    parallel     the parallel-vs-single-process equivalence harness of the diffusers adapters (Wan, CogVideoX)
    models       tiny-model builders and weight perturbations used by several test modules
    runs         reading a run directory's metrics (per-step losses)
    video        test clips encoded with PyAV and damaged copies of them
    vlm_server   a real OpenAI-compatible HTTP server standing in for a VLM
    pairs_dirs   hand-written pairs directories whose better video is the brighter one (labelling tests)
    llava_serve  a tiny random LLaVA saved as a local directory, and `transformers serve` running it

Keep this file free of imports: spawned workers import ``helpers.<module>`` and should load only what they use.
"""
