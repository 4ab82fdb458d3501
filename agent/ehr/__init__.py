"""Results to the hospital's other systems: HL7 v2 ORU^R01 over MLLP and FHIR R4 bundles.

``content.py`` says what a message carries (one screened study, read from the same sanitized
source values and findings as the SR); the builders turn it into bytes; the transports deliver
bytes and say what became of them. The outbox and its sender lanes do the rest (retry, dead
letters, replay), as for the DICOM results.
"""
