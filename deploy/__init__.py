"""Running meddpm-deploy at a site: the container, compose, Kubernetes, the MAP, Orthanc as the research PACS."""
