"""Orthanc as the research PACS: its configuration and the synthesis plugin."""
