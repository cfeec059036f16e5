"""Runs a CLI script under tfds.testing.mock_data, for end-to-end tests without real data.

    python tests/mock_run.py NUM_EXAMPLES train.py --config configs/tiny.py ...

mock_data generates the same deterministic examples in every process, so runs
can be compared across processes (resume tests).
"""

import runpy
import sys

import tensorflow_datasets as tfds

if __name__ == "__main__":
    num_examples, script, *args = sys.argv[1:]
    sys.argv = [script, *args]
    with tfds.testing.mock_data(num_examples=int(num_examples)):
        runpy.run_path(script, run_name="__main__")
