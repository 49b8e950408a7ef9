"""Data and models the project makes or fetches: the synthetic corpus, calibration text, downloads and offline staging, the model zoo, training of the embedded default, task suites."""
