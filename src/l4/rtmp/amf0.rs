//! A small AMF0 decoder, enough to read RTMP command messages (`connect`,
//! `publish`, ...). Input is untrusted: every length is checked against what is
//! left, nesting is bounded, and nothing panics.

/// One decoded AMF0 value. Dates and unsupported exotic types end decoding.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// IEEE-754 double.
    Number(f64),
    /// Boolean.
    Bool(bool),
    /// String or long string (lossy UTF-8).
    String(String),
    /// Object or ECMA array: ordered key/value pairs.
    Object(Vec<(String, Value)>),
    /// Strict array.
    Array(Vec<Value>),
    /// Null or undefined.
    Null,
}

impl Value {
    /// The string inside, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Looks up `key` in an object.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(pairs) => pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Why AMF0 data could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmfError {
    /// The data ends inside a value.
    #[error("AMF0 data truncated")]
    Truncated,
    /// A type marker this decoder does not read.
    #[error("unsupported AMF0 type marker {0:#04x}")]
    Marker(u8),
    /// Objects nested deeper than [`MAX_DEPTH`].
    #[error("AMF0 nesting too deep")]
    TooDeep,
}

/// Deepest nesting accepted: real commands nest two levels; the bound keeps a
/// hostile message from exhausting the stack.
pub const MAX_DEPTH: usize = 8;

/// Decodes values one after another until the data ends. A failure after some
/// values keeps the values read so far (a command's name and arguments come
/// first; trailing exotic values do not matter).
pub fn decode_all(mut data: &[u8]) -> (Vec<Value>, Option<AmfError>) {
    let mut values = Vec::new();
    while !data.is_empty() {
        match decode(&mut data, 0) {
            Ok(v) => values.push(v),
            Err(e) => return (values, Some(e)),
        }
    }
    (values, None)
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], AmfError> {
    if data.len() < n {
        return Err(AmfError::Truncated);
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Ok(head)
}

fn u16_be(data: &mut &[u8]) -> Result<usize, AmfError> {
    let b = take(data, 2)?;
    Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
}

fn u32_be(data: &mut &[u8]) -> Result<usize, AmfError> {
    let b = take(data, 4)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

fn string(data: &mut &[u8], len: usize) -> Result<String, AmfError> {
    Ok(String::from_utf8_lossy(take(data, len)?).into_owned())
}

/// Reads object properties up to the end marker (empty key + 0x09).
fn properties(data: &mut &[u8], depth: usize) -> Result<Vec<(String, Value)>, AmfError> {
    let mut pairs = Vec::new();
    loop {
        let len = u16_be(data)?;
        let key = string(data, len)?;
        if key.is_empty() && data.first() == Some(&0x09) {
            take(data, 1)?;
            return Ok(pairs);
        }
        let value = decode(data, depth + 1)?;
        pairs.push((key, value));
    }
}

fn decode(data: &mut &[u8], depth: usize) -> Result<Value, AmfError> {
    if depth > MAX_DEPTH {
        return Err(AmfError::TooDeep);
    }
    let marker = take(data, 1)?[0];
    Ok(match marker {
        0x00 => {
            let b = take(data, 8)?;
            let mut raw = [0u8; 8];
            raw.copy_from_slice(b);
            Value::Number(f64::from_be_bytes(raw))
        }
        0x01 => Value::Bool(take(data, 1)?[0] != 0),
        0x02 => {
            let len = u16_be(data)?;
            Value::String(string(data, len)?)
        }
        0x03 => Value::Object(properties(data, depth)?),
        0x05 | 0x06 => Value::Null,
        0x08 => {
            // ECMA array: a count hint (not trusted), then properties.
            take(data, 4)?;
            Value::Object(properties(data, depth)?)
        }
        0x0a => {
            let count = u32_be(data)?;
            // Every element takes at least one byte, so the count cannot
            // honestly exceed what is left; this bounds the allocation.
            if count > data.len() {
                return Err(AmfError::Truncated);
            }
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                items.push(decode(data, depth + 1)?);
            }
            Value::Array(items)
        }
        0x0c => {
            let len = u32_be(data)?;
            Value::String(string(data, len)?)
        }
        other => return Err(AmfError::Marker(other)),
    })
}

/// Appends the AMF0 encoding of `value` (strings over 64 KiB as long strings).
pub fn encode(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Number(n) => {
            out.push(0x00);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Value::Bool(b) => out.extend_from_slice(&[0x01, u8::from(*b)]),
        Value::String(s) => match u16::try_from(s.len()) {
            Ok(len) => {
                out.push(0x02);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Err(_) => {
                out.push(0x0c);
                out.extend_from_slice(&(s.len() as u32).to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        },
        Value::Object(pairs) => {
            out.push(0x03);
            for (key, v) in pairs {
                // Keys longer than 64 KiB do not occur in RTMP commands; cut them.
                let key = &key.as_bytes()[..key.len().min(usize::from(u16::MAX))];
                out.extend_from_slice(&(key.len() as u16).to_be_bytes());
                out.extend_from_slice(key);
                encode(out, v);
            }
            out.extend_from_slice(&[0, 0, 0x09]);
        }
        Value::Array(items) => {
            out.push(0x0a);
            out.extend_from_slice(&(items.len() as u32).to_be_bytes());
            items.iter().for_each(|v| encode(out, v));
        }
        Value::Null => out.push(0x05),
    }
}

/// Builders for tests, in the shape encoders send commands.
#[cfg(test)]
pub(crate) mod test_values {
    use super::Value;

    /// A string value.
    pub fn s(text: &str) -> Value {
        Value::String(text.into())
    }

    /// An object of string properties.
    pub fn object(pairs: &[(&str, &str)]) -> Value {
        Value::Object(pairs.iter().map(|(k, v)| (k.to_string(), s(v))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_connect_command() {
        let mut m = Vec::new();
        let sent = [
            test_values::s("connect"),
            Value::Number(1.0),
            test_values::object(&[("app", "live"), ("tcUrl", "rtmp://h/live")]),
            Value::Array(vec![Value::Bool(true), Value::Null]),
        ];
        sent.iter().for_each(|v| encode(&mut m, v));
        let (values, err) = decode_all(&m);
        assert_eq!(values, sent);
        assert_eq!(err, None);
        assert_eq!(values[0].as_str(), Some("connect"));
        assert_eq!(values[1], Value::Number(1.0));
        assert_eq!(values[2].get("app").and_then(Value::as_str), Some("live"));
    }

    #[test]
    fn truncation_and_depth_are_errors() {
        let mut m = Vec::new();
        encode(&mut m, &test_values::s("publish"));
        let (values, err) = decode_all(&m[..m.len() - 2]);
        assert!(values.is_empty());
        assert_eq!(err, Some(AmfError::Truncated));
        let deep: Vec<u8> = std::iter::repeat_n([0x03, 0x00, 0x01, b'k'], 20)
            .flatten()
            .collect();
        assert_eq!(decode_all(&deep).1, Some(AmfError::TooDeep));
        // A strict array claiming four billion items must not allocate them.
        assert_eq!(
            decode_all(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x05]).1,
            Some(AmfError::Truncated)
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..2000 {
            let data: Vec<u8> = (0..len % 97)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 24) as u8
                })
                .collect();
            let _ = decode_all(&data);
        }
    }
}
