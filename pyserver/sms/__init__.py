"""The SMS gateway: texts from phones into conversations over SMPP 3.4 (docs/sms.md).

`gsm` encodes text as SMS carries it (GSM 03.38, UCS-2) and splits long texts;
`concat` builds and reassembles concatenated messages; `pdu` is the SMPP PDU codec
(sans I/O); `esme` is the client session to an SMSC (bind, enquire_link, window,
rebind); `gateway` files texts from phones into conversations; `outbound` texts
users' copies and settles them by receipts; `service` is the gateway's service for
a cluster's app servers (SMS_SUBMIT), and their sender that calls it.

May import: pyserver.errors, pyserver.addresses, pyserver.userid, pyserver.wire,
pyserver.client, pyserver.store, pyserver.servicelink, pyserver.servicekey.
"""
