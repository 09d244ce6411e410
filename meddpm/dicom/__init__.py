"""DICOM masks in (reader), synthetic MR series out (writer), PACS transfers (pacs); options without the libraries."""
