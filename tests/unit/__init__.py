"""Pure code on tests/fakes.py's FakeRuntime and fabricated data: no model files, milliseconds."""
