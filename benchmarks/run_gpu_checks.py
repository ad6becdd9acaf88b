"""The gate of benchmarks/run_gpu.sh between the GPU tests and the benchmarks: reads pytest's JUnit XML and fails
unless the triton and the cuda backends each passed tests and nothing was skipped, failed or errored (on the GPU
machine a skip means a kernel went unchecked, and an unchecked kernel's speed is never reported).

    python benchmarks/run_gpu_checks.py LOGS/gpu_tests.xml
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from typing import List, Tuple


def summarize(path: str) -> Tuple[dict, List[str]]:
    """({'triton': passed, 'cuda': passed}, problems) of the JUnit XML at ``path``."""
    passed = {"triton": 0, "cuda": 0}
    problems = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child.tag for child in case if child.tag in ("skipped", "failure", "error")), None)
        if outcome is not None:
            detail = next(child for child in case if child.tag == outcome).get("message", "")
            problems.append(f"{outcome}: {name} {detail[:200]}")
            continue
        for backend in passed:
            if backend in case.get("name", "").lower():
                passed[backend] += 1
    for backend, count in passed.items():
        if count == 0:
            problems.append(f"no test of the {backend} backend passed")
    return passed, problems


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    passed, problems = summarize(args[0])
    print(f"GPU tests passed: triton {passed['triton']}, cuda {passed['cuda']}")
    if problems:
        print("GPU CHECKS FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
