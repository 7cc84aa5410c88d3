//! The JSON parser of every vipgate JSON-lines protocol (authority, rendezvous, control
//! socket): `serde_json`, but an object with a key twice is refused.
//!
//! RFC 8259 §4 says the names in an object SHOULD be unique and that receivers differ on
//! duplicates; `serde_json::Value` keeps the last one, so `{"cmd":"bogus","cmd":"inquire"}`
//! would be an inquiry to us and something else to a proxy or log reader that keeps the first.
//! A request that means two things is a bad request.

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// Parses `bytes` as one JSON value, refusing an object (at any depth) with a duplicate key:
/// the error says "duplicate key `NAME`" with its line and column.
pub fn parse(bytes: &[u8]) -> serde_json::Result<Value> {
    serde_json::from_slice::<Unique>(bytes).map(|u| u.0)
}

/// [`parse`], then into `T` (whose errors then have no position).
pub fn parse_as<T: DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    serde_json::from_value(parse(bytes)?)
}

/// A JSON value whose objects have unique keys.
struct Unique(Value);

impl<'de> de::Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // serde_json never yields a non-finite number; Null as `Value` itself would.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(Unique(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(de::Error::custom(format_args!("duplicate key `{k}`")));
            }
            let Unique(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_values_as_serde_json() {
        let text = br#"{"id":1,"cmd":"rent","n":[1,-2,3.5,1e300,18446744073709551615,null,true],
            "o":{"a":{"b":"\u00e9"}},"s":"x\n"}"#;
        assert_eq!(parse(text).expect("parse"), serde_json::from_slice::<Value>(text).unwrap());
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        for text in [
            &br#"{"cmd":"bogus","cmd":"inquire"}"#[..],
            br#"{"id":1,"cmd":"inquire","virtual":"198.18.0.7","id":2}"#,
            br#"{"id":1,"x":{"a":1,"a":1}}"#,
            br#"[{"a":1},{"b":2,"b":3}]"#,
        ] {
            let e = parse(text).expect_err(std::str::from_utf8(text).unwrap()).to_string();
            assert!(e.starts_with("duplicate key `"), "{e}");
            assert!(e.contains("line 1 column"), "{e}");
        }
        // The same key in sibling objects is fine.
        parse(br#"[{"a":1},{"a":2}]"#).expect("siblings");
    }

    #[test]
    fn recursion_stays_bounded() {
        let deep = "[".repeat(100_000);
        assert!(parse(deep.as_bytes()).is_err());
    }
}
