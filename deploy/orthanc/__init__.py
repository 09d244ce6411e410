"""Orthanc as the research PACS: the synthesis plugin, its demo and the viewer check."""
