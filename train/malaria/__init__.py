"""The malaria cell classifier: the ResNet (`models`), its presets (`presets`) and training (`fit`)."""
