"""The SMS gateway: texts from phones into conversations over SMPP 3.4 (docs/sms.md).

`gsm` encodes text as SMS carries it (GSM 03.38, UCS-2) and splits long texts;
`concat` builds and reassembles concatenated messages; `pdu` is the SMPP PDU codec
(sans I/O); `esme` is the client session to an SMSC (bind, enquire_link, window,
rebind); `gateway` maps texts to and from conversations.

May import: pyserver.errors, pyserver.addresses, pyserver.userid, pyserver.wire,
pyserver.client, pyserver.store.
"""
