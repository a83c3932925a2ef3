//! Arithmetic on named numbers and command templates, as written in profiles:
//! `"M104 S{value:.0}"`, `"WR DM890 {temperature * 10:05}"`, `"{100 + channel}"`.
//!
//! An expression is numbers, names, `+ - * /` and parentheses. A template is text
//! with `{expression[:format]}` holes; the format is `.N` (N decimals), `0W`
//! (integer zero-padded to W digits), `0W.N`, `x` / `X` (hexadecimal integer) or
//! `0Wx`. `{{` and `}}` are literal braces.

use std::collections::BTreeSet;
use std::fmt;

/// Named numbers available when an expression is evaluated.
pub trait Scope {
    fn get(&self, name: &str) -> Option<f64>;
}

impl Scope for &[(&str, f64)] {
    fn get(&self, name: &str) -> Option<f64> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

/// Two scopes, the first one winning.
pub struct Layered<'a>(pub &'a dyn Scope, pub &'a dyn Scope);

impl Scope for Layered<'_> {
    fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).or_else(|| self.1.get(name))
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExprError {
    #[error("{0}")]
    Syntax(String),
    #[error("`{0}` has no value here")]
    Unknown(String),
    #[error("`{0}` is not a finite number")]
    NotFinite(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Number(f64),
    Name(String),
    Neg(Box<Expr>),
    Binary(Box<Expr>, char, Box<Expr>),
}

impl Expr {
    pub fn parse(text: &str) -> Result<Expr, ExprError> {
        let mut p = ExprParser {
            chars: text.char_indices().peekable(),
            text,
            depth: 0,
        };
        let e = p.sum()?;
        p.skip_space();
        match p.chars.peek() {
            None => Ok(e),
            Some(&(i, c)) => Err(ExprError::Syntax(format!(
                "unexpected `{c}` at column {} of `{text}`",
                i + 1
            ))),
        }
    }

    pub fn eval(&self, scope: &dyn Scope) -> Result<f64, ExprError> {
        let v = match self {
            Expr::Number(n) => *n,
            Expr::Name(n) => scope.get(n).ok_or_else(|| ExprError::Unknown(n.clone()))?,
            Expr::Neg(e) => -e.eval(scope)?,
            Expr::Binary(a, op, b) => {
                let (a, b) = (a.eval(scope)?, b.eval(scope)?);
                match op {
                    '+' => a + b,
                    '-' => a - b,
                    '*' => a * b,
                    _ => a / b,
                }
            }
        };
        if v.is_finite() {
            Ok(v)
        } else {
            Err(ExprError::NotFinite(self.to_string()))
        }
    }

    /// Every name the expression uses.
    pub fn names(&self, out: &mut BTreeSet<String>) {
        match self {
            Expr::Number(_) => {}
            Expr::Name(n) => {
                out.insert(n.clone());
            }
            Expr::Neg(e) => e.names(out),
            Expr::Binary(a, _, b) => {
                a.names(out);
                b.names(out);
            }
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Number(n) => write!(f, "{n}"),
            Expr::Name(n) => f.write_str(n),
            Expr::Neg(e) => write!(f, "-({e})"),
            Expr::Binary(a, op, b) => write!(f, "({a} {op} {b})"),
        }
    }
}

struct ExprParser<'a> {
    chars: std::iter::Peekable<std::str::CharIndices<'a>>,
    text: &'a str,
    depth: usize,
}

/// Deeper nesting than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 32;

impl ExprParser<'_> {
    fn skip_space(&mut self) {
        while self.chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            self.chars.next();
        }
    }

    fn sum(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.product()?;
        loop {
            self.skip_space();
            match self.chars.peek() {
                Some(&(_, op @ ('+' | '-'))) => {
                    self.chars.next();
                    let right = self.product()?;
                    left = Expr::Binary(Box::new(left), op, Box::new(right));
                }
                _ => return Ok(left),
            }
        }
    }

    fn product(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.unary()?;
        loop {
            self.skip_space();
            match self.chars.peek() {
                Some(&(_, op @ ('*' | '/'))) => {
                    self.chars.next();
                    let right = self.unary()?;
                    left = Expr::Binary(Box::new(left), op, Box::new(right));
                }
                _ => return Ok(left),
            }
        }
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        self.skip_space();
        if self.chars.peek().is_some_and(|&(_, c)| c == '-') {
            self.chars.next();
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(ExprError::Syntax("expression nested too deeply".into()));
            }
            let e = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Neg(Box::new(e)));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Expr, ExprError> {
        self.skip_space();
        let Some(&(start, c)) = self.chars.peek() else {
            return Err(ExprError::Syntax(format!(
                "`{}` ends where a number or a name was expected",
                self.text
            )));
        };
        if c == '(' {
            self.chars.next();
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(ExprError::Syntax("expression nested too deeply".into()));
            }
            let e = self.sum()?;
            self.depth -= 1;
            self.skip_space();
            return match self.chars.next() {
                Some((_, ')')) => Ok(e),
                _ => Err(ExprError::Syntax(format!("missing `)` in `{}`", self.text))),
            };
        }
        let mut end = start;
        if c.is_ascii_digit() || c == '.' {
            while let Some(&(i, c)) = self.chars.peek() {
                if c.is_ascii_digit() || c == '.' || c == 'e' || c == 'E' {
                    end = i + c.len_utf8();
                    self.chars.next();
                } else {
                    break;
                }
            }
            let s = &self.text[start..end];
            return s
                .parse::<f64>()
                .map(Expr::Number)
                .map_err(|_| ExprError::Syntax(format!("`{s}` is not a number")));
        }
        if c.is_alphabetic() || c == '_' {
            while let Some(&(i, c)) = self.chars.peek() {
                if c.is_alphanumeric() || c == '_' || c == '.' {
                    end = i + c.len_utf8();
                    self.chars.next();
                } else {
                    break;
                }
            }
            return Ok(Expr::Name(self.text[start..end].to_string()));
        }
        Err(ExprError::Syntax(format!(
            "unexpected `{c}` at column {} of `{}`",
            start + 1,
            self.text
        )))
    }
}

/// How a template hole prints its number.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NumberFormat {
    pub width: usize,
    pub zero_pad: bool,
    pub decimals: Option<usize>,
    pub hex: Option<bool>, // Some(uppercase)
}

impl NumberFormat {
    fn parse(spec: &str) -> Result<NumberFormat, ExprError> {
        let bad = || ExprError::Syntax(format!("`{spec}` is not a format (try .1, 05, 04.1 or x)"));
        let mut f = NumberFormat::default();
        let mut rest = spec;
        if let Some(r) = rest.strip_suffix('x') {
            f.hex = Some(false);
            rest = r;
        } else if let Some(r) = rest.strip_suffix('X') {
            f.hex = Some(true);
            rest = r;
        }
        let (width, decimals) = match rest.split_once('.') {
            Some((w, d)) => (w, Some(d)),
            None => (rest, None),
        };
        if !width.is_empty() {
            f.zero_pad = width.starts_with('0');
            f.width = width.parse().map_err(|_| bad())?;
            if f.width > 32 {
                return Err(bad());
            }
        }
        if let Some(d) = decimals {
            let d: usize = d.parse().map_err(|_| bad())?;
            if d > 12 || f.hex.is_some() {
                return Err(bad());
            }
            f.decimals = Some(d);
        }
        Ok(f)
    }

    pub fn format(&self, v: f64) -> String {
        let body = if let Some(upper) = self.hex {
            let n = v.round().clamp(0.0, u64::MAX as f64) as u64;
            if upper {
                format!("{n:X}")
            } else {
                format!("{n:x}")
            }
        } else {
            match self.decimals {
                Some(d) => format!("{v:.d$}"),
                // No format: integers print without decimals, others as they are.
                None if self.width > 0 || v.fract() == 0.0 => format!("{}", v.round() as i64),
                None => format!("{v}"),
            }
        };
        if body.len() >= self.width {
            return body;
        }
        let pad = self.width - body.len();
        if self.zero_pad {
            match body.strip_prefix('-') {
                Some(digits) => format!("-{}{digits}", "0".repeat(pad)),
                None => format!("{}{body}", "0".repeat(pad)),
            }
        } else {
            format!("{}{body}", " ".repeat(pad))
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Hole(Expr, NumberFormat),
}

/// A command template, parsed once when the profile is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pieces: Vec<Piece>,
    source: String,
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, ExprError> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(['{', '}']) {
            literal.push_str(&rest[..i]);
            let c = rest.as_bytes()[i];
            if rest[i + 1..].starts_with(c as char) {
                literal.push(c as char);
                rest = &rest[i + 2..];
                continue;
            }
            if c == b'}' {
                return Err(ExprError::Syntax(format!(
                    "unmatched `}}` in `{text}` (write `}}}}` for a brace)"
                )));
            }
            let Some(close) = rest[i..].find('}') else {
                return Err(ExprError::Syntax(format!("unclosed `{{` in `{text}`")));
            };
            let hole = &rest[i + 1..i + close];
            let (expr, format) = match hole.rsplit_once(':') {
                Some((e, f)) => (e, NumberFormat::parse(f.trim())?),
                None => (hole, NumberFormat::default()),
            };
            if !literal.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut literal)));
            }
            pieces.push(Piece::Hole(Expr::parse(expr)?, format));
            rest = &rest[i + close + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Template {
            pieces,
            source: text.to_string(),
        })
    }

    pub fn render(&self, scope: &dyn Scope) -> Result<String, ExprError> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Hole(e, f) => out.push_str(&f.format(e.eval(scope)?)),
            }
        }
        Ok(out)
    }

    /// A template that is one hole, e.g. `"{value * 10}"`, evaluates to a number
    /// (register writes); plain numbers are accepted too.
    pub fn number(&self, scope: &dyn Scope) -> Result<f64, ExprError> {
        match self.pieces.as_slice() {
            [Piece::Hole(e, _)] => e.eval(scope),
            _ => {
                let text = self.render(scope)?;
                text.trim()
                    .parse()
                    .map_err(|_| ExprError::Syntax(format!("`{text}` is not a number")))
            }
        }
    }

    pub fn names(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for p in &self.pieces {
            if let Piece::Hole(e, _) = p {
                e.names(&mut out);
            }
        }
        out
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl<'de> serde::Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Template;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a template string such as \"M104 S{value:.0}\", or a number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Template, E> {
                Template::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Template, E> {
                Template::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Template, E> {
                Template::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Template, E> {
                Template::parse(&v.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn render(t: &str, scope: &[(&str, f64)]) -> String {
        Template::parse(t).unwrap().render(&scope).unwrap()
    }

    #[test]
    fn formats() {
        assert_eq!(render("M104 S{value:.0}", &[("value", 37.4)]), "M104 S37");
        assert_eq!(
            render("WR DM890 {t * 10:05}", &[("t", 37.0)]),
            "WR DM890 00370"
        );
        assert_eq!(render("1SP {rpm:.1}", &[("rpm", 12.25)]), "1SP 12.2");
        assert_eq!(render("mv:st {slot:03}", &[("slot", 7.0)]), "mv:st 007");
        assert_eq!(render("se:pb 20 {f:04X}", &[("f", 255.0)]), "se:pb 20 00FF");
        assert_eq!(render("{100 + channel}", &[("channel", 3.0)]), "103");
        assert_eq!(render("{-2.5:05.1}", &[]), "-02.5");
        assert_eq!(render("{{literal}}", &[]), "{literal}");
        assert_eq!(render("G0 X{x:.2}", &[("x", 1.0 / 3.0)]), "G0 X0.33");
        assert_eq!(render("{(a + b) * 2}", &[("a", 1.0), ("b", 2.0)]), "6");
    }

    #[test]
    fn errors() {
        assert!(Template::parse("M104 S{value").is_err());
        assert!(Template::parse("M104 S}").is_err());
        assert!(Template::parse("{value:zz}").is_err());
        assert!(Template::parse("{1 +}").is_err());
        let t = Template::parse("{missing}").unwrap();
        assert_eq!(
            t.render(&&[][..]).unwrap_err(),
            ExprError::Unknown("missing".into())
        );
        let t = Template::parse("{1 / zero}").unwrap();
        assert!(t.render(&&[("zero", 0.0)][..]).is_err());
        let deep = format!("{{{}1{}}}", "(".repeat(100), ")".repeat(100));
        assert!(Template::parse(&deep).is_err());
    }

    #[test]
    fn names_are_collected() {
        let t = Template::parse("{a * b:.1} {c}").unwrap();
        assert_eq!(
            t.names().into_iter().collect::<Vec<_>>(),
            vec!["a".to_string(), "b".into(), "c".into()]
        );
    }

    proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,40}", v in -1e6f64..1e6) {
            if let Ok(t) = Template::parse(&text) {
                let scope = [("value", v)];
                let _ = t.render(&&scope[..]);
            }
        }

        #[test]
        fn zero_padded_integers_round_trip(n in 0u32..100_000, w in 1usize..8) {
            let t = Template::parse(&format!("{{n:0{w}}}")).unwrap();
            let s = t.render(&&[("n", f64::from(n))][..]).unwrap();
            prop_assert!(s.len() >= w);
            prop_assert_eq!(s.parse::<u32>().unwrap(), n);
        }
    }
}
