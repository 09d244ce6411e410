#!/usr/bin/env bash
# Install Debian's Orthanc PACS with its DICOMweb, Python (the synthesis plugin, deploy/orthanc/) and web viewer
# plugins, and Chromium (the browser test of the viewer), for the PACS integration tests, when missing.
# The tests start their own Orthanc on free loopback ports; the package's service is kept from starting
# (a temporary policy-rc.d), so nothing holds 4242/8042 afterwards.
set -euo pipefail
PLUGINS=/usr/share/orthanc/plugins
if command -v Orthanc >/dev/null && command -v chromium >/dev/null && [[ -f $PLUGINS/libOrthancDicomWeb.so ]] \
    && [[ -f $PLUGINS/libOrthancPython.so ]] && [[ -f $PLUGINS/libOrthancWebViewer.so ]]; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "warning: Orthanc is missing and this is not root; the PACS tests fail until root runs scripts/setup_pacs.sh" >&2
    exit 0
fi
POLICY=/usr/sbin/policy-rc.d
if [[ ! -e $POLICY ]]; then
    printf '#!/bin/sh\nexit 101\n' > $POLICY
    chmod 0755 $POLICY
    trap 'rm -f $POLICY' EXIT
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb orthanc-python \
    orthanc-webviewer chromium >/dev/null
