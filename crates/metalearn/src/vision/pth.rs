//! PyTorch `.pth` weight files, read without Python and without executing anything.
