"""`python -m bench corpus --out DIR [--users N] [--messages M] [--seed S] [--formats ...]`:
realistic mailboxes to import, the same for the same seed.

Users 1..N (`user<N>@corpus.example`) each get a few friends (mutual), and
their mailboxes fill with about M messages each, conversation by conversation
with friends: chat bursts (a few quick lines back and forth), mail threads
(each reply quotes the one before, with In-Reply-To and References; some carry
an attachment; bodies in UTF-8, ISO-8859-1, KOI8-R or Shift_JIS, sent base64,
quoted-printable or 8-bit) and texts from outside phone numbers. Read states
vary (older messages are read, the latest of a conversation often not).

Written to DIR, in the formats asked for:

* `messages.jsonl` (every channel; a line is a copy for each user it names),
  attachments under `files/`;
* `mbox/<address>.mbox` (each user's mail, with Status headers) and
  `maildir/<address>/` (the same mail; the user's own in `.Sent`), plus
  `addresses.csv` (address,user) for `pyserver import tree`.

The generator is seeded (`random.Random(seed)`), so a corpus is reproducible.
`generate()` is the API the import benchmark calls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

DOMAIN = "corpus.example"
START_TS = 1_700_000_000
FORMATS = ("jsonl", "mbox", "maildir")

_WORDS = [
    "plan",
    "meeting",
    "lunch",
    "friday",
    "report",
    "budget",
    "draft",
    "photos",
    "trip",
    "train",
    "ticket",
    "weekend",
    "family",
    "garden",
    "coffee",
    "review",
    "deadline",
    "concert",
    "movie",
    "project",
    "notes",
    "slides",
    "call",
    "tomorrow",
    "tonight",
    "morning",
    "quick",
    "question",
    "update",
    "thanks",
    "great",
    "idea",
    "sounds",
    "good",
    "later",
    "maybe",
    "soon",
    "office",
    "home",
    "invoice",
    "figures",
    "summer",
    "winter",
    "holiday",
    "birthday",
]
# (charset, transfer encoding, sentences written in it)
_CHARSETS = (
    ("utf-8", "base64", ("Ça marche, à demain!", "Grüße aus München.", "¿Qué tal?")),
    ("utf-8", "quoted-printable", ("Naïve café, déjà vu.", "Smörgåsbord för alla.")),
    ("utf-8", "8bit", ("See you soon", "emoji time 🎉 ok")),
    ("iso-8859-1", "quoted-printable", ("Très bien, merci.", "L'été à la plage.")),
    ("koi8-r", "base64", ("Привет, как дела?", "До встречи завтра.")),
    ("shift_jis", "base64", ("こんにちは、元気ですか。", "また明日。")),
)


@dataclass(slots=True)
class Message:
    """One message of the corpus, before it is written in any format."""

    id: str
    channel: str
    sender: int | str
    recipients: list[int]
    ts: int
    text: str
    subject: str = ""
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    read: bool = True
    attachment: tuple[str, str, bytes] | None = None
    charset: tuple[str, str] = ("utf-8", "8bit")


def address(user: int) -> str:
    return f"user{user}@{DOMAIN}"


def _friends(rng: random.Random, users: int, per_user: int) -> dict[int, list[int]]:
    friends: dict[int, set[int]] = {user: set() for user in range(1, users + 1)}
    for user in range(1, users + 1):
        while len(friends[user]) < min(per_user, users - 1):
            other = rng.randint(1, users)
            if other != user:
                friends[user].add(other)
                friends[other].add(user)
    return {user: sorted(found) for user, found in friends.items()}


def _sentence(rng: random.Random) -> str:
    words = rng.choices(_WORDS, k=rng.randint(4, 12))
    return " ".join(words).capitalize() + rng.choice((".", "?", "!"))


def messages(users: int, per_user: int, seed: int) -> Iterator[Message]:
    """The corpus's messages, conversation by conversation (see the module docstring)."""
    rng = random.Random(seed)
    friends = _friends(rng, users, 5)
    held = dict.fromkeys(range(1, users + 1), 0)
    clock = START_TS
    number = 0
    for user in range(1, users + 1):
        while held[user] < per_user:
            wanted = per_user - held[user]
            kind = rng.random()
            clock += rng.randint(60, 7200)
            if kind < 0.15:  # a text from an outside phone number
                number += 1
                phone = f"+1555{rng.randint(0, 9_999_999):07d}"
                yield Message(f"s{seed}-{number}", "sms", phone, [user], clock,
                              _sentence(rng), read=rng.random() < 0.7)  # fmt: skip
                held[user] += 1
                continue
            friend = min(friends[user], key=lambda f: (held[f] >= per_user, rng.random()))
            pair = (user, friend)
            if kind < 0.6:  # a chat burst
                for turn in range(min(rng.randint(3, 8), wanted)):
                    number += 1
                    clock += rng.randint(2, 90)
                    yield Message(f"c{seed}-{number}", "chat", pair[turn % 2], [pair[1 - turn % 2]],
                                  clock, _sentence(rng), read=rng.random() < 0.8)  # fmt: skip
                    held[user] += 1
                    held[friend] += 1
                continue
            # a mail thread with quoting
            subject = " ".join(rng.choices(_WORDS, k=3))
            charset, encoding, sentences = rng.choice(_CHARSETS)
            previous: Message | None = None
            references: list[str] = []
            for turn in range(min(rng.randint(1, 4), wanted)):
                number += 1
                clock += rng.randint(300, 20000)
                text = f"{rng.choice(sentences)}\n{_sentence(rng)}\n"
                if previous is not None:
                    quoted = "".join(f"> {line}\n" for line in previous.text.splitlines())
                    text = f"{text}\nOn {previous.ts} {previous.sender} wrote:\n{quoted}"
                attachment = None
                if rng.random() < 0.12:
                    size = rng.randint(1_000, 20_000)
                    name = rng.choice(("report.pdf", "photo.jpg", "notes.txt", "data.bin"))
                    attachment = (name, _type_of(name), rng.randbytes(size))
                message_id = f"<m{seed}-{number}@{DOMAIN}>"
                message = Message(
                    message_id, "email", pair[turn % 2], [pair[1 - turn % 2]], clock, text,
                    subject=("Re: " if previous else "") + subject,
                    in_reply_to=previous.id if previous else None,
                    references=list(references), read=rng.random() < 0.75,
                    attachment=attachment, charset=(charset, encoding),
                )  # fmt: skip
                yield message
                references.append(message_id)
                previous = message
                held[user] += 1
                held[friend] += 1


def _type_of(name: str) -> str:
    return {"pdf": "application/pdf", "jpg": "image/jpeg", "txt": "text/plain"}.get(
        name.rsplit(".", 1)[1], "application/octet-stream"
    )


def mail_bytes(message: Message) -> bytes:
    """The message as an RFC 5322 mail."""
    mail = EmailMessage()
    mail["From"] = address(message.sender) if isinstance(message.sender, int) else message.sender
    mail["To"] = ", ".join(address(user) for user in message.recipients)
    mail["Subject"] = message.subject
    mail["Message-ID"] = message.id
    mail["Date"] = format_datetime(datetime.fromtimestamp(message.ts, UTC))
    if message.in_reply_to:
        mail["In-Reply-To"] = message.in_reply_to
        mail["References"] = " ".join(message.references)
    charset, encoding = message.charset
    mail.set_content(message.text, charset=charset, cte=encoding)
    if message.attachment is not None:
        name, kind, data = message.attachment
        maintype, subtype = kind.split("/")
        if maintype == "text":
            mail.add_attachment(data.hex(), subtype=subtype, filename=name)
        else:
            mail.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
        # a boundary of its own, not a random one: the same seed writes the same bytes
        digest = hashlib.blake2b(message.id.encode(), digest_size=12).hexdigest()
        mail.set_boundary(f"=_corpus_{digest}")
    return bytes(mail)


@dataclass(slots=True)
class Written:
    """What `generate` wrote."""

    users: int
    messages: int
    copies: int
    mails: int
    paths: dict[str, str]


def generate(
    out: Path, users: int, per_user: int, seed: int = 1, formats: tuple[str, ...] = FORMATS
) -> Written:
    """Write the corpus of `users` x about `per_user` messages to `out`; what was written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "files").mkdir(exist_ok=True)
    paths: dict[str, str] = {}
    jsonl = None
    if "jsonl" in formats:
        paths["jsonl"] = str(out / "messages.jsonl")
        jsonl = open(paths["jsonl"], "w", encoding="utf-8")  # noqa: SIM115 (closed below)
    mboxes: dict[int, list[bytes]] = {}
    count = copies = mails = 0
    try:
        for message in messages(users, per_user, seed):
            count += 1
            copies += len(message.recipients) + isinstance(message.sender, int)
            if jsonl is not None:
                jsonl.write(json.dumps(_line(message, out), ensure_ascii=False) + "\n")
            if message.channel == "email" and ("mbox" in formats or "maildir" in formats):
                mails += 1
                raw = mail_bytes(message)
                for user in [message.sender, *message.recipients]:
                    mboxes.setdefault(user, []).append(_flagged(raw, message, user))
    finally:
        if jsonl is not None:
            jsonl.close()
    if "mbox" in formats:
        paths["mbox"] = str(out / "mbox")
        _write_mboxes(out / "mbox", mboxes)
    if "maildir" in formats:
        paths["maildir"] = str(out / "maildir")
        _write_maildirs(out / "maildir", mboxes)
    with open(out / "addresses.csv", "w") as book:
        book.write("address,user\n")
        book.writelines(f"{address(user)},{user}\n" for user in range(1, users + 1))
    paths["map"] = str(out / "addresses.csv")
    return Written(users, count, copies, mails, paths)


def _line(message: Message, out: Path) -> dict[str, object]:
    line: dict[str, object] = {
        "id": message.id, "channel": message.channel, "from": message.sender,
        "to": message.recipients, "ts": message.ts, "text": message.text,
    }  # fmt: skip
    if message.subject:
        line["subject"] = message.subject
    if not message.read:
        line["read"] = False
    if message.in_reply_to:
        line["in_reply_to"] = message.in_reply_to
    if message.attachment is not None:
        name, kind, data = message.attachment
        digest = hashlib.blake2b(message.id.encode(), digest_size=8).hexdigest()
        path = out / "files" / f"{digest}-{name}"
        path.write_bytes(data)
        line["attachments"] = [{"path": f"files/{path.name}", "name": name, "type": kind}]
    return line


def _flagged(raw: bytes, message: Message, user: int | str) -> bytes:
    """The mail as `user`'s mailbox keeps it: a Status header saying whether it was read."""
    read = message.read or user == message.sender
    return (b"Status: RO\n" if read else b"Status: O\n") + raw


def _write_mboxes(folder: Path, boxes: dict[int, list[bytes]]) -> None:
    folder.mkdir(exist_ok=True)
    for user, mails in boxes.items():
        with open(folder / f"{address(user)}.mbox", "wb") as box:
            for raw in mails:
                body = raw.replace(b"\r\n", b"\n")
                body = b"\n".join(
                    b">" + line if line.startswith(b"From ") else line for line in body.split(b"\n")
                )  # mboxo quoting
                box.write(b"From MAILER-DAEMON Thu Jan  1 00:00:00 1970\n" + body + b"\n\n")


def _write_maildirs(folder: Path, boxes: dict[int, list[bytes]]) -> None:
    for user, mails in boxes.items():
        root = folder / address(user)
        for sub in ("", ".Sent"):
            for part in ("cur", "new", "tmp"):
                (root / sub / part).mkdir(parents=True, exist_ok=True)
        mine = f"From: {address(user)}".encode()
        for number, raw in enumerate(mails, start=1):
            read = raw.startswith(b"Status: RO")
            body = raw.split(b"\n", 1)[1]
            sent = mine in body.split(b"\n\n", 1)[0]
            sub = root / ".Sent" if sent else root
            name = f"{START_TS + number}.{number}.corpus"
            target = sub / "cur" / f"{name}:2,S" if read else sub / "new" / name
            target.write_bytes(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench corpus", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--messages", type=int, default=100, help="about this many per user")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--formats", default=",".join(FORMATS), help="jsonl,mbox,maildir")
    args = parser.parse_args(argv)
    formats = tuple(name for name in args.formats.split(",") if name)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        parser.error(f"unknown formats: {', '.join(sorted(unknown))}")
    written = generate(args.out, args.users, args.messages, args.seed, formats)
    print(json.dumps({"users": written.users, "messages": written.messages,
                      "copies": written.copies, "mails": written.mails,
                      "paths": written.paths}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
