//! An independent reader of the connector's Avro values
//! (the body of a framed value, or of one with `cdclake.encoding: avro`;
//! see `debezium/converter/.../AvroBinary.java`):
//! it walks the published Connect schema beside the bytes and gives the
//! payload back as Kafka Connect's `JsonConverter` writes it, so tests read
//! every message as JSON with schemas whatever the connector's format.
//!
//! Written apart from the sink's reader (`cdc_sink::decode`) on purpose: a
//! test that compares Kafka with the lake must not read Kafka with the code
//! it checks.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};

/// The JSON payload of an Avro `value` under the Connect schema `schema`
/// (the JSON the schema topic holds). Panics with where it stopped if the
/// bytes do not follow the schema: in a test that is a failure to report.
pub fn payload_json(schema: &Value, value: &[u8]) -> Value {
    let mut r = Reader {
        bytes: value,
        at: 0,
    };
    let out = r.value(schema);
    assert_eq!(
        r.at,
        value.len(),
        "{} bytes left after the Avro value",
        value.len() - r.at
    );
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn value(&mut self, schema: &Value) -> Value {
        if schema["optional"].as_bool().unwrap_or(false) {
            // The union ["null", T]: index 0 is null.
            match self.long() {
                0 => return Value::Null,
                1 => {}
                i => panic!("union index {i} at byte {}", self.at),
            }
        }
        match schema["type"].as_str().expect("a schema with a type") {
            "boolean" => Value::Bool(self.take(1)[0] != 0),
            "int8" | "int16" | "int32" | "int64" => self.long().into(),
            "float" | "float32" => {
                let f = f32::from_le_bytes(self.take(4).try_into().unwrap());
                // Jackson writes a float by its shortest text, not as the
                // double it widens to.
                number(f.is_finite().then(|| f.to_string()), f64::from(f))
            }
            "double" | "float64" => {
                let d = f64::from_le_bytes(self.take(8).try_into().unwrap());
                number(d.is_finite().then(|| d.to_string()), d)
            }
            "string" => {
                let b = self.bytes_field();
                Value::String(String::from_utf8(b.to_vec()).expect("an Avro string is UTF-8"))
            }
            // Decimal too: its unscaled bytes, which JsonConverter base64-encodes.
            "bytes" => Value::String(STANDARD.encode(self.bytes_field())),
            "array" => {
                let mut items = Vec::new();
                loop {
                    let n = match self.long() {
                        0 => break,
                        // A negative count is followed by the block's size in bytes.
                        n if n < 0 => {
                            self.long();
                            n.unsigned_abs()
                        }
                        n => n.unsigned_abs(),
                    };
                    for _ in 0..n {
                        items.push(self.value(&schema["items"]));
                    }
                }
                Value::Array(items)
            }
            "struct" => {
                let mut m = Map::new();
                for f in schema["fields"].as_array().expect("struct fields") {
                    let name = f["field"].as_str().expect("a field name").to_string();
                    m.insert(name, self.value(f));
                }
                Value::Object(m)
            }
            other => panic!("no Avro reading of a `{other}` schema"),
        }
    }

    fn take(&mut self, n: usize) -> &[u8] {
        assert!(
            self.at + n <= self.bytes.len(),
            "the Avro value ends inside a field at byte {}",
            self.at
        );
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        out
    }

    fn bytes_field(&mut self) -> &[u8] {
        let n = usize::try_from(self.long()).expect("a negative length");
        self.take(n)
    }

    /// A zig-zag varint.
    fn long(&mut self) -> i64 {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return (v >> 1) as i64 ^ -((v & 1) as i64);
            }
        }
        panic!("a varint longer than 10 bytes at byte {}", self.at)
    }
}

/// A number as Jackson writes it: its text when finite, else `"NaN"`,
/// `"Infinity"` or `"-Infinity"` (Jackson's default for non-finite).
fn number(text: Option<String>, d: f64) -> Value {
    match text {
        Some(t) => serde_json::from_str(&t).expect("a finite number's text"),
        None if d.is_nan() => "NaN".into(),
        None if d > 0.0 => "Infinity".into(),
        None => "-Infinity".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn zigzag(n: i64) -> Vec<u8> {
        let mut v = ((n << 1) ^ (n >> 63)) as u64;
        let mut out = Vec::new();
        while v >= 0x80 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
        out
    }

    #[test]
    fn reads_a_record_with_every_shape() {
        let schema = json!({"type": "struct", "fields": [
            {"field": "id", "type": "int64", "optional": false},
            {"field": "name", "type": "string", "optional": true},
            {"field": "gone", "type": "string", "optional": true},
            {"field": "ok", "type": "boolean", "optional": false},
            {"field": "f", "type": "float", "optional": false},
            {"field": "d", "type": "double", "optional": false},
            {"field": "b", "type": "bytes", "optional": false},
            {"field": "xs", "type": "array", "optional": false,
             "items": {"type": "int32", "optional": false}},
        ]});
        let mut v = zigzag(-300);
        v.extend(zigzag(1));
        v.extend(zigzag(2));
        v.extend(b"hi");
        v.extend(zigzag(0));
        v.push(1);
        v.extend(1.1f32.to_le_bytes());
        v.extend(f64::NAN.to_le_bytes());
        v.extend(zigzag(2));
        v.extend([0xff, 0x00]);
        v.extend(zigzag(2));
        v.extend(zigzag(7));
        v.extend(zigzag(-7));
        v.extend(zigzag(0));
        assert_eq!(
            payload_json(&schema, &v),
            json!({"id": -300, "name": "hi", "gone": null, "ok": true, "f": 1.1,
                   "d": "NaN", "b": "/wA=", "xs": [7, -7]})
        );
    }

    #[test]
    #[should_panic(expected = "ends inside a field")]
    fn a_short_value_is_a_failure() {
        let schema = json!({"type": "string", "optional": false});
        payload_json(&schema, &[8, b'a']);
    }
}
