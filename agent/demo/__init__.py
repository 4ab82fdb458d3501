"""The end-to-end demo (``strnet demo``) and the local Orthanc it uses as a test PACS."""
