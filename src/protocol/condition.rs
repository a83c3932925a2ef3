//! Conditions on device signals: `"br.od600 >= 0.6 and br.ph < 7.2"`.
//!
//! Comparisons are joined by `and` / `or`; `and` binds tighter than `or`, as in
//! most languages. There are no parentheses in version 1.

use serde::Serialize;
use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "==")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
}

impl Op {
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }

    pub fn holds(self, left: f64, right: f64) -> bool {
        match self {
            Op::Lt => left < right,
            Op::Le => left <= right,
            Op::Gt => left > right,
            Op::Ge => left >= right,
            Op::Eq => (left - right).abs() < 1e-9,
            Op::Ne => (left - right).abs() >= 1e-9,
        }
    }
}

/// One comparison as written; ranges are byte ranges in the condition text.
#[derive(Debug, Clone, PartialEq)]
pub struct RawComparison {
    pub role: String,
    pub signal: String,
    pub op: Op,
    pub value: String,
    pub subject_range: Range<usize>,
    pub value_range: Range<usize>,
}

/// `any` of the groups holds when `all` of a group's comparisons hold.
#[derive(Debug, Clone, PartialEq)]
pub struct RawCondition {
    pub any: Vec<Vec<RawComparison>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionError {
    pub message: String,
    pub range: Range<usize>,
}

pub fn parse_condition(text: &str) -> Result<RawCondition, ConditionError> {
    if let Some(at) = text.find(['(', ')']) {
        return Err(ConditionError {
            message: "conditions have no parentheses in format 1; `and` binds tighter than `or`"
                .into(),
            range: at..at + 1,
        });
    }
    let mut any = Vec::new();
    let mut all = Vec::new();
    let mut clause_start = 0;
    let words = word_ranges(text);
    if words.is_empty() {
        return Err(ConditionError {
            message: "empty condition".into(),
            range: 0..text.len(),
        });
    }
    let mut i = 0;
    let mut pending_join: Option<Range<usize>> = None;
    while i <= words.len() {
        let joiner = words.get(i).map(|r| &text[r.clone()]);
        if matches!(joiner, Some("and" | "or")) || i == words.len() {
            let end = words.get(i).map_or(text.len(), |r| r.start);
            let clause = &text[clause_start..end];
            if clause.trim().is_empty() {
                let range = pending_join
                    .clone()
                    .or_else(|| words.get(i).cloned())
                    .unwrap_or(0..text.len());
                return Err(ConditionError {
                    message: "a comparison is missing next to `and`/`or`".into(),
                    range,
                });
            }
            all.push(parse_comparison(clause, clause_start)?);
            if joiner == Some("or") || i == words.len() {
                any.push(std::mem::take(&mut all));
            }
            pending_join = words.get(i).cloned();
            clause_start = words.get(i).map_or(text.len(), |r| r.end);
        }
        i += 1;
    }
    Ok(RawCondition { any })
}

fn word_ranges(text: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if let Some(s) = start.take() {
                out.push(s..i);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        out.push(s..text.len());
    }
    out
}

fn parse_comparison(clause: &str, base: usize) -> Result<RawComparison, ConditionError> {
    let lead = clause.len() - clause.trim_start().len();
    let trimmed = clause.trim();
    let whole = base + lead..base + lead + trimmed.len();
    let ops = [
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("==", Op::Eq),
        ("!=", Op::Ne),
        ("<", Op::Lt),
        (">", Op::Gt),
    ];
    let is_op_char = |c: char| matches!(c, '=' | '<' | '>' | '!');
    let Some(at) = trimmed.find(is_op_char) else {
        return Err(ConditionError {
            message: format!(
                "`{trimmed}` is not a comparison; write `<role>.<signal> <op> <value>` with one of < <= > >= == !="
            ),
            range: whole,
        });
    };
    let written: String = trimmed[at..]
        .chars()
        .take_while(|c| is_op_char(*c))
        .collect();
    let len = written.len();
    let Some(&(_, op)) = ops.iter().find(|(sym, _)| *sym == written) else {
        // `=>`, `=<`, `=` and `<>` are common slips; name the operator that was meant.
        let meant = match written.as_str() {
            "=>" => "did you mean `>=`?",
            "=<" => "did you mean `<=`?",
            "=" => "did you mean `==`?",
            "<>" => "did you mean `!=`?",
            _ => "use one of < <= > >= == !=",
        };
        let start = whole.start + at;
        return Err(ConditionError {
            message: format!("unknown operator `{written}`; {meant}"),
            range: start..start + len,
        });
    };
    let subject = trimmed[..at].trim();
    let value = trimmed[at + len..].trim();
    let subject_start = whole.start;
    let subject_range = subject_start..subject_start + subject.len();
    let value_lead = trimmed[at + len..].len() - trimmed[at + len..].trim_start().len();
    let value_start = whole.start + at + len + value_lead;
    let value_range = value_start..value_start + value.len();
    let Some((role, signal)) = subject.split_once('.') else {
        return Err(ConditionError {
            message: format!(
                "`{subject}` does not name a signal; write `<role>.<signal>`, e.g. `br.od600`"
            ),
            range: if subject.is_empty() {
                whole
            } else {
                subject_range
            },
        });
    };
    if role.is_empty() || signal.is_empty() || signal.contains('.') || subject.contains(' ') {
        return Err(ConditionError {
            message: format!(
                "`{subject}` does not name a signal; write `<role>.<signal>`, e.g. `br.od600`"
            ),
            range: subject_range,
        });
    }
    if value.is_empty() {
        return Err(ConditionError {
            message: format!("the comparison `{trimmed}` has no value"),
            range: whole,
        });
    }
    Ok(RawComparison {
        role: role.to_string(),
        signal: signal.to_string(),
        op,
        value: value.to_string(),
        subject_range,
        value_range,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn and_binds_tighter_than_or() {
        let c =
            parse_condition("br.od600 >= 0.6 and br.ph < 7.2 or br.temperature > 40 C").unwrap();
        assert_eq!(c.any.len(), 2);
        assert_eq!(c.any[0].len(), 2);
        assert_eq!(c.any[1][0].signal, "temperature");
        assert_eq!(c.any[1][0].value, "40 C");
        assert_eq!(c.any[0][1].op, Op::Lt);
    }

    #[test]
    fn ranges_point_into_the_text() {
        let text = "br.od600 >= 0.6 and br.phh < 7";
        let c = parse_condition(text).unwrap();
        assert_eq!(&text[c.any[0][1].subject_range.clone()], "br.phh");
        assert_eq!(&text[c.any[0][0].value_range.clone()], "0.6");
    }

    #[test]
    fn malformed_conditions_are_errors() {
        for bad in [
            "",
            "br.od600",
            "od600 > 1",
            "br.od600 > ",
            "br.od600 > 1 and",
            "br.od600 => 1",
            "and br.ph < 7",
        ] {
            assert!(parse_condition(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,60}") {
            if let Err(e) = parse_condition(&s) {
                prop_assert!(e.range.end <= s.len());
                prop_assert!(s.is_char_boundary(e.range.start) && s.is_char_boundary(e.range.end));
            }
        }
    }
}
