"""STR-Net: multi-task bone-loss screening from knee radiographs (research, NOT FOR DIAGNOSTIC USE).

This package never imports ``agent``, pynetdicom, SQLAlchemy or highdicom.
"""

__version__ = "0.1.0"
