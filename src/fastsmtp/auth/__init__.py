"""Who sent it: SPF, DKIM, DMARC and ARC, reported in Authentication-Results."""
