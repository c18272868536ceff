"""The built-in demo: procedurally drawn scenes, and the cached demo model and gallery."""
