"""What the tests and the benchmarks (bench/) both use: real service processes and ORL's
folders and splits (:mod:`testkit.harness`), harder pictures made from ORL faces
(:mod:`testkit.scenes`). Imported from the repository root (on ``sys.path`` for pytest and for
bench/ through ``bench/_common.py``); it imports nothing of facegrad, and is not installed."""
