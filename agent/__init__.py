"""strnet-agent: a DICOM agent that screens knee radiographs for bone loss.

Research software. NOT FOR DIAGNOSTIC USE.
"""

__version__ = "0.1.0"
