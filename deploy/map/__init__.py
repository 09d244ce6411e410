"""The MONAI Application Package: its build context rendered by the packager, and the specification's checks."""
