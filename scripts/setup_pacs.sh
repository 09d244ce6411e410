#!/usr/bin/env bash
# Install Debian's Orthanc PACS and its DICOMweb plugin for the PACS integration tests, when missing.
# The tests start their own Orthanc on free loopback ports; the package's service is kept from starting
# (a temporary policy-rc.d), so nothing holds 4242/8042 afterwards.
set -euo pipefail
PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
if command -v Orthanc >/dev/null && [[ -f $PLUGIN ]]; then
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
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null
