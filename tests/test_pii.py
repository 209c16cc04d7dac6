"""PII redaction (distlm/data/preprocess/pii.py): what is replaced, what is left alone, and the counts a real
`preprocess` run writes into stats.json and its summary."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from conftest import decoded_documents

from distlm.config import ConfigError, compose_config
from distlm.data.preprocess.pii import Redactor
from distlm.data.preprocess.pipeline import preprocess
from distlm.data.preprocess.stats import summary_lines
from distlm.data.shards import STATS_FILE

PLANTED = {   # kind -> addresses and numbers that must be replaced
    "email": ["john.doe@example.com", "j.o-hn+news@mail.example.co.uk", "ANNA_42@Sub-Domain.Example.ORG"],
    "ipv4": ["192.168.0.1", "8.8.8.8", "10.0.0.255", "255.255.255.0"],
    "ipv6": ["2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:db8::1", "fe80::1ff:fe23:4567:890a", "fe80::1",
             "::ffff:192.0.2.128"],
    "phone": ["(555) 123-4567", "555-123-4567", "555.123.4567", "555 123 4567", "+1 555 123 4567", "+1-555-123-4567",
              "1-800-555-0199", "+1 (555) 123-4567", "+44 20 7946 0958", "+44 (0)20 7946 0958", "+49 30 1234567",
              "+33 1 23 45 67 89", "+91 98765 43210", "020 7946 0958", "06 12 34 56 78"],
}
LEFT_ALONE = [   # what looks a little like personal data but is not
    # version numbers: a dotted quad after a version word is a version, and so are longer dotted runs
    "version 1.2.3.4", "Version: 10.0.0.1", "release 4.2.1.0", "v 2.0.1.3", "v1.2.3.4", "1.2.3.4.5", "256.1.1.1",
    # dates and times
    "2024-01-15", "15/01/2024", "01.15.2024", "2024.01.15", "at 12:30", "12:30:45", "10:15:30.250",
    # decimals and ordinary numbers
    "pi is 3.14159265", "1,234,567 people", "1234567890", "0.123 4567", "x = 0.5 * 10 ** 3", "pages 123-145",
    "years 1990-2000", "score 3-1", "ISBN 978-3-16-148410-0", "call 555-1234", "$1,299.99",
    # code
    "x = a[1::2]", "y = a[::1]", "std::vector<int> v; Foo::Bar::baz()", "@property\ndef f(self): return a@b.T",
    "f'{user}@{host}'", "MAC 00:1A:2B:3C:4D:5E", "ratio 16:9", "git checkout v2.1.0",
    # scripture references, as in the demo corpus
    "John 3:16 and Genesis 1:1-3", "In the beginning God created the heaven and the earth.",
]


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor.from_config(compose_config().data.pii)


@pytest.mark.parametrize("kind", PLANTED)
def test_planted_personal_data_is_replaced_by_its_placeholder(redactor, kind):
    placeholder = redactor.placeholders[kind]
    for value in PLANTED[kind]:
        for text, expected in ((value, placeholder),
                               (f"Contact: {value}, thanks.", f"Contact: {placeholder}, thanks."),
                               (f"({value})\n", f"({placeholder})\n")):
            assert redactor.redact_text(text) == expected, (kind, text)


@pytest.mark.parametrize("text", LEFT_ALONE)
def test_versions_dates_decimals_and_code_are_left_alone(redactor, text):
    assert redactor.redact_text(text) == text


def test_matches_are_counted_per_document_and_kind(redactor):
    texts = pa.array(["mail a@example.com or b@example.org from 10.1.2.3",
                      "nothing here but version 1.2.3.4",
                      "+44 20 7946 0958 and 2001:db8::7"], pa.string())
    redacted, counts = redactor.redact(texts)
    assert redacted.to_pylist() == ["mail <EMAIL> or <EMAIL> from <IP>", "nothing here but version 1.2.3.4",
                                    "<PHONE> and <IP>"]
    assert redactor.kinds == ["email", "ipv4", "ipv6", "phone"]
    assert counts.tolist() == [[2, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]


def test_patterns_of_your_own_take_their_placeholders_and_win_over_built_in_kinds():
    pii = compose_config("+data.pii.patterns.ssn='[0-9]{3}-[0-9]{2}-[0-9]{4}'",
                         "+data.pii.patterns.staff='[a-z]+@corp[.]example[.]com'", "+data.pii.placeholders.ssn='<SSN>'",
                         "+data.pii.placeholders.staff='<STAFF>'", "data.pii.kinds=[email]").data.pii
    redactor = Redactor.from_config(pii)
    assert redactor.kinds == ["email", "ssn", "staff"]
    redacted, counts = redactor.redact(pa.array(["SSN 123-45-6789 of alice@corp.example.com, by x@example.com; "
                                                 "555-123-4567"]))
    assert redacted.to_pylist() == ["SSN <SSN> of <STAFF>, by <EMAIL>; 555-123-4567"]   # phone is not in kinds
    assert counts.tolist() == [[1, 1, 1]]


@pytest.mark.parametrize("override, message", [
    ("data.pii.kinds=[email,passport]", "data.pii.kinds: unknown ['passport']"),
    ("+data.pii.patterns.bad='(unclosed'", "data.pii.patterns.bad: not a Python regular expression"),
    ("+data.pii.patterns.empty='x*'", "data.pii.patterns.empty: matches the empty string"),
    ("+data.pii.patterns.ssn='[0-9]{9}'", "data.pii.placeholders.ssn: missing"),
])
def test_a_bad_pii_setting_is_refused_naming_the_key(override, message, tmp_path):
    corpus = tmp_path / "a.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        preprocess(compose_config(f"data.inputs=[{corpus}]", f"data.dir={tmp_path / 'out'}", override))
    assert not (tmp_path / "out").exists()


def test_preprocess_counts_replacements_per_kind_in_stats_and_summary(ray_local, kjv_chapters, data_config,
                                                                      tmp_path):
    chapters = [c["text"] for c in kjv_chapters[:40]]
    planted = {i: f"{chapters[i]}\nWrite to {PLANTED['email'][i % 3]} or call {PLANTED['phone'][i % 15]}; "
                  f"server {PLANTED['ipv4'][i % 4]}, {PLANTED['ipv6'][i % 5]}. Build version 1.2.3.4."
               for i in range(0, 40, 4)}   # 10 chapters, each with one of every kind
    corpus = tmp_path / "kjv_pii.jsonl"
    corpus.write_text("".join(json.dumps({"text": planted.get(i, t)}) + "\n" for i, t in enumerate(chapters)))
    manifest = preprocess(data_config([corpus], tmp_path / "out", "data.near_dup_threshold=null"))
    stats = json.loads((tmp_path / "out" / STATS_FILE).read_text())
    assert sum(stats["documents"].values()) == 40
    assert stats["pii"] == {kind: {"replaced": 10, "documents": 10} for kind in ("email", "ipv4", "ipv6", "phone")}
    assert "PII replaced in the kept documents: email 10 in 10 docs, ipv4 10 in 10 docs, ipv6 10 in 10 docs, " \
           "phone 10 in 10 docs" in summary_lines(stats)
    text = "\n".join(decoded_documents(manifest, "train") + decoded_documents(manifest, "val"))
    assert text.count("<EMAIL>") + text.count("<PHONE>") > 0 and "version 1.2.3.4" in text
    for values in PLANTED.values():
        assert not any(value in text for value in values)
