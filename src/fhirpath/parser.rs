//! Recursive-descent parser from tokens to the [`Expr`] tree, following the FHIRPath operator precedence.

use rust_decimal::Decimal;
use std::sync::OnceLock;

use super::SyntaxError;
use super::ast::{BinaryOp, Call, Expr, ExprKind, Func, TypeOp, TypeSpec, UnaryOp};
use super::lexer::{Tok, Token, tokenize};
use super::quantity::calendar_keyword;
use super::temporal::Temporal;

/// Deepest nesting of parentheses/arguments accepted while parsing; keeps hostile input from
/// exhausting the parser's stack (each level costs a dozen precedence-level frames).
pub const MAX_NESTING: usize = 40;

/// Deepest expression tree accepted (the evaluator recurses once per level).
pub const MAX_TREE_DEPTH: u32 = 128;

pub fn parse_expression(src: &str) -> Result<Expr, SyntaxError> {
    let tokens = tokenize(src)?;
    let mut p = Parser { tokens, i: 0, depth: 0 };
    let e = p.expression()?;
    match &p.peek().tok {
        Tok::Eof => Ok(e),
        _ => Err(SyntaxError::new("unexpected text after the expression", p.peek().pos)),
    }
}

struct Parser {
    tokens: Vec<Token>,
    i: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        // The token list always ends with Eof, and `i` never passes it.
        &self.tokens[self.i.min(self.tokens.len() - 1)]
    }

    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        if self.i < self.tokens.len() - 1 {
            self.i += 1;
        }
        t
    }

    fn is_op(&self, op: &str) -> bool {
        matches!(&self.peek().tok, Tok::Op(o) if *o == op)
    }

    fn is_keyword(&self, word: &str) -> bool {
        matches!(&self.peek().tok, Tok::Ident(w) if w == word)
    }

    fn expect_op(&mut self, op: &str) -> Result<(), SyntaxError> {
        if self.is_op(op) {
            self.next();
            Ok(())
        } else {
            Err(SyntaxError::new(format!("expected '{op}'"), self.peek().pos))
        }
    }

    fn enter(&mut self) -> Result<(), SyntaxError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(SyntaxError::new("expression nested too deeply", self.peek().pos));
        }
        Ok(())
    }

    fn expression(&mut self) -> Result<Expr, SyntaxError> {
        self.enter()?;
        let r = self.implies();
        self.depth -= 1;
        r
    }

    fn binary(op: BinaryOp, left: Expr, right: Expr) -> Result<Expr, SyntaxError> {
        let pos = left.pos;
        node(ExprKind::Binary(op, Box::new(left), Box::new(right)), pos)
    }

    fn implies(&mut self) -> Result<Expr, SyntaxError> {
        let mut left = self.or_xor()?;
        while self.is_keyword("implies") {
            self.next();
            let right = self.or_xor()?;
            left = Self::binary(BinaryOp::Implies, left, right)?;
        }
        Ok(left)
    }

    fn or_xor(&mut self) -> Result<Expr, SyntaxError> {
        let mut left = self.and()?;
        loop {
            let op = if self.is_keyword("or") {
                BinaryOp::Or
            } else if self.is_keyword("xor") {
                BinaryOp::Xor
            } else {
                return Ok(left);
            };
            self.next();
            let right = self.and()?;
            left = Self::binary(op, left, right)?;
        }
    }

    fn and(&mut self) -> Result<Expr, SyntaxError> {
        let mut left = self.membership()?;
        while self.is_keyword("and") {
            self.next();
            let right = self.membership()?;
            left = Self::binary(BinaryOp::And, left, right)?;
        }
        Ok(left)
    }

    fn membership(&mut self) -> Result<Expr, SyntaxError> {
        let mut left = self.equality()?;
        loop {
            let op = if self.is_keyword("in") {
                BinaryOp::In
            } else if self.is_keyword("contains") {
                BinaryOp::Contains
            } else {
                return Ok(left);
            };
            self.next();
            let right = self.equality()?;
            left = Self::binary(op, left, right)?;
        }
    }

    fn equality(&mut self) -> Result<Expr, SyntaxError> {
        let mut left = self.inequality()?;
        loop {
            let op = match &self.peek().tok {
                Tok::Op("=") => BinaryOp::Eq,
                Tok::Op("!=") => BinaryOp::Ne,
                Tok::Op("~") => BinaryOp::Equiv,
                Tok::Op("!~") => BinaryOp::NotEquiv,
                _ => return Ok(left),
            };
            self.next();
            let right = self.inequality()?;
            left = Self::binary(op, left, right)?;
        }
    }

    fn inequality(&mut self) -> Result<Expr, SyntaxError> {
        let mut left = self.union()?;
        loop {
            let op = match &self.peek().tok {
                Tok::Op("<") => BinaryOp::Lt,
                Tok::Op(">") => BinaryOp::Gt,
                Tok::Op("<=") => BinaryOp::Le,
                Tok::Op(">=") => BinaryOp::Ge,
                _ => return Ok(left),
            };
            self.next();
            let right = self.union()?;
            left = Self::binary(op, left, right)?;
        }
    }

    fn union(&mut self) -> Result<Expr, SyntaxError> {
        let mut left = self.type_expr()?;
        while self.is_op("|") {
            self.next();
            let right = self.type_expr()?;
            left = Self::binary(BinaryOp::Union, left, right)?;
        }
        Ok(left)
    }

    fn type_expr(&mut self) -> Result<Expr, SyntaxError> {
        let mut left = self.additive()?;
        loop {
            let op = if self.is_keyword("is") {
                TypeOp::Is
            } else if self.is_keyword("as") {
                TypeOp::As
            } else {
                return Ok(left);
            };
            self.next();
            let spec = self.type_specifier()?;
            let pos = left.pos;
            left = node(ExprKind::TypeOp(op, Box::new(left), spec), pos)?;
        }
    }

    fn type_specifier(&mut self) -> Result<TypeSpec, SyntaxError> {
        let first = self.identifier()?;
        if self.is_op(".") {
            self.next();
            let second = self.identifier()?;
            return Ok(TypeSpec { namespace: Some(first.into()), name: second.into() });
        }
        Ok(TypeSpec { namespace: None, name: first.into() })
    }

    fn identifier(&mut self) -> Result<String, SyntaxError> {
        let t = self.next();
        match t.tok {
            Tok::Ident(s) | Tok::Quoted(s) => Ok(s),
            _ => Err(SyntaxError::new("expected an identifier", t.pos)),
        }
    }

    fn additive(&mut self) -> Result<Expr, SyntaxError> {
        let mut left = self.multiplicative()?;
        loop {
            let op = match &self.peek().tok {
                Tok::Op("+") => BinaryOp::Add,
                Tok::Op("-") => BinaryOp::Sub,
                Tok::Op("&") => BinaryOp::Concat,
                _ => return Ok(left),
            };
            self.next();
            let right = self.multiplicative()?;
            left = Self::binary(op, left, right)?;
        }
    }

    fn multiplicative(&mut self) -> Result<Expr, SyntaxError> {
        let mut left = self.unary()?;
        loop {
            let op = match &self.peek().tok {
                Tok::Op("*") => BinaryOp::Mul,
                Tok::Op("/") => BinaryOp::Div,
                Tok::Ident(w) if w == "div" => BinaryOp::IntDiv,
                Tok::Ident(w) if w == "mod" => BinaryOp::Mod,
                _ => return Ok(left),
            };
            self.next();
            let right = self.unary()?;
            left = Self::binary(op, left, right)?;
        }
    }

    fn unary(&mut self) -> Result<Expr, SyntaxError> {
        let op = match &self.peek().tok {
            Tok::Op("+") => UnaryOp::Plus,
            Tok::Op("-") => UnaryOp::Minus,
            _ => return self.postfix(),
        };
        let pos = self.next().pos;
        self.enter()?;
        let operand = self.unary();
        self.depth -= 1;
        node(ExprKind::Unary(op, Box::new(operand?)), pos)
    }

    fn postfix(&mut self) -> Result<Expr, SyntaxError> {
        let mut e = self.term()?;
        loop {
            if self.is_op(".") {
                self.next();
                let pos = self.peek().pos;
                let name = self.identifier()?;
                if self.is_op("(") {
                    e = self.call(Some(e), name, pos)?;
                } else {
                    let start = e.pos;
                    e = node(ExprKind::Member(Box::new(e), name.into()), start)?;
                }
            } else if self.is_op("[") {
                self.next();
                let index = self.expression()?;
                self.expect_op("]")?;
                let start = e.pos;
                e = node(ExprKind::Index(Box::new(e), Box::new(index)), start)?;
            } else {
                return Ok(e);
            }
        }
    }

    fn term(&mut self) -> Result<Expr, SyntaxError> {
        let t = self.next();
        let pos = t.pos;
        let kind = match t.tok {
            Tok::Op("(") => {
                let e = self.expression()?;
                self.expect_op(")")?;
                return Ok(e);
            }
            Tok::Op("{") => {
                self.expect_op("}")?;
                ExprKind::Empty
            }
            Tok::Str(s) => ExprKind::String(s.into()),
            Tok::Number(n) => return self.number(&n, pos),
            Tok::DateTime(text) => ExprKind::Temporal(temporal_literal(&text).ok_or_else(|| {
                SyntaxError::new(format!("invalid date/time literal '@{text}'"), pos)
            })?),
            Tok::Special(s) => match s.as_str() {
                "this" => ExprKind::This,
                "index" => ExprKind::IndexVar,
                "total" => ExprKind::Total,
                _ => return Err(SyntaxError::new(format!("unknown variable '${s}'"), pos)),
            },
            Tok::External(name) => ExprKind::External(name.into()),
            Tok::Ident(name) => {
                if self.is_op("(") {
                    return self.call(None, name, pos);
                }
                match name.as_str() {
                    "true" => ExprKind::Boolean(true),
                    "false" => ExprKind::Boolean(false),
                    _ => ExprKind::Identifier(name.into()),
                }
            }
            Tok::Quoted(name) => {
                if self.is_op("(") {
                    return self.call(None, name, pos);
                }
                ExprKind::Identifier(name.into())
            }
            Tok::Eof => return Err(SyntaxError::new("unexpected end of expression", pos)),
            Tok::Op(op) => return Err(SyntaxError::new(format!("unexpected '{op}'"), pos)),
        };
        node(kind, pos)
    }

    fn number(&mut self, text: &str, pos: usize) -> Result<Expr, SyntaxError> {
        let unit = match &self.peek().tok {
            Tok::Str(u) => Some(u.clone()),
            Tok::Ident(w) if calendar_keyword(w).is_some() => Some(w.clone()),
            _ => None,
        };
        if let Some(unit) = unit {
            self.next();
            let value: Decimal = text.parse().map_err(|_| SyntaxError::new("number out of range", pos))?;
            return node(ExprKind::Quantity(value, unit.into()), pos);
        }
        let kind = if text.contains('.') {
            ExprKind::Decimal(text.parse().map_err(|_| SyntaxError::new("decimal out of range", pos))?)
        } else {
            match text.parse::<i64>() {
                Ok(n) => ExprKind::Integer(n),
                Err(_) => ExprKind::Decimal(text.parse().map_err(|_| SyntaxError::new("number out of range", pos))?),
            }
        };
        node(kind, pos)
    }

    fn call(&mut self, target: Option<Expr>, name: String, pos: usize) -> Result<Expr, SyntaxError> {
        let func = Func::from_name(&name).ok_or_else(|| SyntaxError::new(format!("unknown function '{name}'"), pos))?;
        self.expect_op("(")?;
        let mut args = Vec::new();
        if !self.is_op(")") {
            loop {
                args.push(self.expression()?);
                if self.is_op(",") {
                    self.next();
                } else {
                    break;
                }
            }
        }
        self.expect_op(")")?;
        let (min, max) = func.arity();
        if args.len() < min || args.len() > max {
            return Err(SyntaxError::new(
                format!("function '{name}' takes {min}..{max} arguments, got {}", args.len()),
                pos,
            ));
        }
        let type_arg = if matches!(func, Func::Is | Func::As | Func::OfType) {
            let spec = args.first().and_then(type_spec_of).ok_or_else(|| SyntaxError::new(format!("'{name}' needs a type name"), pos))?;
            args.clear();
            Some(spec)
        } else {
            None
        };
        let start = target.as_ref().map_or(pos, |t| t.pos);
        node(ExprKind::Call(Box::new(Call { target, func, args, type_arg, regex: OnceLock::new() })), start)
    }
}

/// Builds a node, refusing trees deeper than [`MAX_TREE_DEPTH`]: a flat chain like
/// `1 + 1 + … + 1` or `a.a.a…` is parsed by a loop but still makes a deep tree, which the
/// evaluator (and dropping the tree) would walk recursively.
fn node(kind: ExprKind, pos: usize) -> Result<Expr, SyntaxError> {
    let child = |e: &Expr| e.depth;
    let below = match &kind {
        ExprKind::Member(t, _) | ExprKind::Unary(_, t) | ExprKind::TypeOp(_, t, _) => child(t),
        ExprKind::Binary(_, l, r) | ExprKind::Index(l, r) => child(l).max(child(r)),
        ExprKind::Call(c) => c.args.iter().map(child).chain(c.target.as_ref().map(child)).max().unwrap_or(0),
        _ => 0,
    };
    let depth = below + 1;
    if depth > MAX_TREE_DEPTH {
        return Err(SyntaxError::new("expression too deeply nested or too long a chain", pos));
    }
    Ok(Expr { kind, pos, depth, memo: None })
}

/// Reads a type argument written as an expression (`Quantity`, `FHIR.Patient`).
fn type_spec_of(e: &Expr) -> Option<TypeSpec> {
    match &e.kind {
        ExprKind::Identifier(name) => Some(TypeSpec { namespace: None, name: name.clone() }),
        ExprKind::Member(inner, name) => match &inner.kind {
            ExprKind::Identifier(ns) => Some(TypeSpec { namespace: Some(ns.clone()), name: name.clone() }),
            _ => None,
        },
        _ => None,
    }
}

fn temporal_literal(text: &str) -> Option<Temporal> {
    if let Some(time) = text.strip_prefix('T') {
        return Temporal::parse_time(time);
    }
    if text.contains('T') {
        return Temporal::parse_datetime(text, true);
    }
    Temporal::parse_date(text)
}
