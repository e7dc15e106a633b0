"""Generated from proto/ by `python -m controller.api.generate`; do not edit."""
