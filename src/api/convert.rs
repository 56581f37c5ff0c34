//! Conversions between protobuf well-known types and domain types, with field-path errors.

use chrono::{DateTime, Utc};
use prost_types::{ListValue, Struct, Timestamp, Value as PbValue, value::Kind};
use serde_json::{Map, Number, Value};
use uuid::Uuid;

use crate::error::{Error, Result};

/// A required UUID field.
pub fn parse_id(field: &str, s: &str) -> Result<Uuid> {
    if s.is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    Uuid::parse_str(s).map_err(|_| Error::invalid(field, "must be a UUID"))
}

/// An optional UUID field: empty means unset.
pub fn parse_optional_id(field: &str, s: &str) -> Result<Option<Uuid>> {
    if s.is_empty() { Ok(None) } else { parse_id(field, s).map(Some) }
}

/// A known enum value; unknown numbers are INVALID_ARGUMENT.
pub fn enum_value<E: TryFrom<i32>>(field: &str, v: i32) -> Result<E> {
    E::try_from(v).map_err(|_| Error::invalid(field, format!("unknown enum value {v}")))
}

pub fn timestamp(field: &str, t: &Timestamp) -> Result<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Error::invalid(field, "nanos must be within 0..1e9"));
    }
    DateTime::<Utc>::from_timestamp(t.seconds, t.nanos as u32).ok_or_else(|| Error::invalid(field, "out of range"))
}

pub fn to_timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// A Duration as signed seconds (validity of the sign is the caller's business).
pub fn duration_secs(field: &str, d: &prost_types::Duration) -> Result<f64> {
    if d.nanos.abs() >= 1_000_000_000 || (d.seconds > 0 && d.nanos < 0) || (d.seconds < 0 && d.nanos > 0) {
        return Err(Error::invalid(field, "malformed duration"));
    }
    Ok(d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

pub fn struct_to_json(s: Struct) -> Value {
    Value::Object(s.fields.into_iter().map(|(k, v)| (k, pb_value_to_json(v))).collect())
}

fn pb_value_to_json(v: PbValue) -> Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => Number::from_f64(n).map(Value::Number).unwrap_or(Value::Null),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(pb_value_to_json).collect()),
    }
}

pub fn json_to_struct(v: Value) -> Struct {
    match v {
        Value::Object(map) => Struct { fields: map.into_iter().map(|(k, v)| (k, json_to_pb_value(v))).collect() },
        other => {
            let mut map = Map::new();
            map.insert("value".into(), other);
            json_to_struct(Value::Object(map))
        }
    }
}

fn json_to_pb_value(v: Value) -> PbValue {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(ListValue { values: a.into_iter().map(json_to_pb_value).collect() }),
        Value::Object(_) => Kind::StructValue(json_to_struct(v)),
    };
    PbValue { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_round_trip() {
        let v = serde_json::json!({"a": 1.5, "b": [true, null, "x"], "c": {"d": "e"}});
        assert_eq!(struct_to_json(json_to_struct(v.clone())), v);
    }

    #[test]
    fn ids_and_durations() {
        assert!(parse_id("id", "nope").is_err());
        assert!(parse_id("id", "").is_err());
        assert_eq!(parse_optional_id("id", "").expect("empty"), None);
        assert_eq!(duration_secs("ttl", &prost_types::Duration { seconds: -5, nanos: 0 }).expect("neg"), -5.0);
        assert!(duration_secs("ttl", &prost_types::Duration { seconds: 1, nanos: -1 }).is_err());
    }
}
