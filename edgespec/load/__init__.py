"""From what a user names to a loaded pair: model files (`models`), the memory check, the
pair check, the drafter registry and the one engine builder (`builder.EngineSpec`, `build`)."""
