//! PyTorch `.pth` weight files, read without Python and without executing anything.
//!
//! `torch.save(model.state_dict(), path)` writes a Python pickle of the state dict whose tensors
//! point at raw storages kept beside it, in one of two layouts:
//!
//! * the zip archive that PyTorch writes by default since 1.6: `<name>/data.pkl` holds the
//!   pickle and `<name>/data/<key>` the bytes of each storage;
//! * the legacy layout (`_use_new_zipfile_serialization=False`, and every file from before 1.6):
//!   five pickles one after the other (a magic number, the format version 1001, facts about the
//!   machine, the state dict, the sorted list of storage keys), then each storage in that order
//!   as an 8-byte little-endian element count followed by its raw little-endian bytes.
//!
//! Unpickling in Python can run arbitrary code, since a pickle names functions to call. This
//! module interprets pickles itself, into a tree of [`candle_core::pickle::Object`]s, and calls
//! nothing: it knows only the opcodes `torch.save` writes, and it refuses any file that names a
//! function or class outside a short allow-list (the tensor and parameter rebuilders, torch's
//! storage classes and `collections.OrderedDict`). A pickled whole `nn.Module`, which only its
//! Python class could rebuild, is therefore refused with a message that says to save its
//! `state_dict()` instead. Every limit (string lengths, nesting depth, the work memo look-ups may
//! cause) is checked, so a damaged or hostile file gives an error, never a panic.

use std::collections::HashMap;
use std::fmt::Display;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::pickle::Object;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The number `torch.save` pickles first in a legacy file, as the 10 little-endian bytes of its
/// `LONG1` opcode.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// The legacy format's version number, its second pickle.
const LEGACY_PROTOCOL_VERSION: i64 = 1001;

/// Deepest nesting of pickled objects accepted (a state dict needs fewer than ten levels).
const MAX_DEPTH: u32 = 200;

/// Every tensor of a PyTorch weight file (a state dict), by name, in the file's order.
///
/// Reads both the zip format that `torch.save` writes by default and the legacy format
/// (`_use_new_zipfile_serialization=False`). The file may hold the state dict itself or a
/// training checkpoint, a dict holding it under `state_dict`, `model_state_dict` or `model`,
/// which is picked automatically. Entries that are not tensors (a `_metadata` attribute, an
/// epoch counter) are skipped. Tensors keep their shape and dtype (f32, f64, f16, bf16, i64, i32,
/// i16 and u8; `bool` tensors come back as u8 zeros and ones) and live on the CPU; views are
/// resolved (storage offset and strides, so a transposed tensor reads as it was saved).
///
/// # Errors
/// [`Error::Io`] if the file cannot be read, and [`Error::Checkpoint`], naming the file, if it
/// is empty, truncated, neither a zip archive nor a legacy torch file, uses pickle opcodes or
/// tensor types this reader does not know, or pickles anything but plain tensors and dicts (such
/// as a whole `nn.Module`, which only running its Python code could rebuild).
pub fn read_pth(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let src = Source(path);
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = Vec::with_capacity(16);
    (&mut file)
        .take(16)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(path, e))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    if head.is_empty() {
        return Err(src.err("is empty, not a PyTorch weight file"));
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return read_zip(&src, file);
    }
    if head.len() >= 15
        && head[0] == 0x80
        && head[2] == 0x8a
        && head[3] == 10
        && head[4..14] == LEGACY_MAGIC
        && head[14] == b'.'
    {
        return read_legacy(&src, file, len);
    }
    let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let shown = shown.join(" ");
    if head[0] == 0x80 {
        return Err(src.err(format!(
            "starts like a Python pickle (bytes {shown}) but not with the magic number torch.save \
             writes: it is not a PyTorch weight file"
        )));
    }
    Err(src.err(format!(
        "is neither a zip archive (the format torch.save writes since PyTorch 1.6) nor a legacy \
         PyTorch file: it starts with the bytes {shown}"
    )))
}

/// The file being read, to name it in every message.
struct Source<'a>(&'a Path);

impl Source<'_> {
    fn err(&self, msg: impl Display) -> Error {
        Error::Checkpoint(format!("`{}` {msg}", self.0.display()))
    }

    fn io(&self, e: std::io::Error) -> Error {
        Error::io(self.0, e)
    }

    /// Turns a pickle error at byte `pos` of `what` (which pickle) into a message.
    fn pickle_err(&self, e: PickleError, what: &str) -> Error {
        match e {
            PickleError::Io(e) => self.io(e),
            PickleError::Truncated { pos } => self.err(format!(
                "is truncated: {what} breaks off at byte {pos}, before its end"
            )),
            PickleError::Global { module, name } => {
                let mut msg = format!(
                    "pickles `{module}.{name}`, which only running Python code could rebuild; \
                     metalearn reads weights without executing code: save `model.state_dict()` \
                     with `torch.save` instead"
                );
                if module.starts_with("__torch__") {
                    msg.push_str(
                        " (this looks like a TorchScript archive from `torch.jit.save`, which \
                         metalearn does not read)",
                    );
                }
                self.err(msg)
            }
            PickleError::Malformed { pos, msg } => {
                self.err(format!("has a malformed {what} (at byte {pos}): {msg}"))
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// The pickle interpreter.

/// Why a pickle could not be read.
#[derive(Debug)]
enum PickleError {
    /// The input ended before the pickle's STOP opcode.
    Truncated { pos: u64 },
    /// Reading failed.
    Io(std::io::Error),
    /// The pickle names a global outside the allow-list.
    Global { module: String, name: String },
    /// Anything else: an unknown opcode, a stack underflow, a limit exceeded.
    Malformed { pos: u64, msg: String },
}

type PResult<T> = std::result::Result<T, PickleError>;

/// An object on the interpreter's stack or in its memo, with what it costs.
#[derive(Debug, Clone)]
struct Node {
    obj: Object,
    /// Number of objects in the tree (what cloning it costs).
    size: u64,
    /// Nesting depth of the tree.
    depth: u32,
}

impl Node {
    fn leaf(obj: Object) -> Self {
        Node {
            obj,
            size: 1,
            depth: 1,
        }
    }
}

/// Whether a pickled global may appear in a weight file: tensor and parameter rebuilders,
/// torch's storage classes, and the `OrderedDict` a state dict is.
fn allowed_global(module: &str, name: &str) -> bool {
    matches!(
        (module, name),
        ("collections", "OrderedDict")
            | (
                "torch._utils",
                "_rebuild_tensor_v2" | "_rebuild_parameter" | "_rebuild_parameter_with_state"
            )
            | ("torch._tensor", "_rebuild_from_type_v2")
            | ("torch.nn.parameter", "Parameter")
            | ("torch", "Tensor")
    ) || (module == "torch"
        && name.len() > "Storage".len()
        && name.ends_with("Storage")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
}

/// The name of a pickle opcode, for messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "not a pickle opcode",
    }
}

/// A pickle interpreter that builds objects and never calls anything.
///
/// It reads the opcodes of pickle protocols 2 to 4 that describe dicts, lists, tuples, numbers,
/// strings, persistent ids (torch's storage references) and calls of allow-listed globals; it
/// records a call as an [`Object::Reduce`] rather than making it. Memo entries are copies, as in
/// candle's interpreter: a container memoised before it was filled reads back empty, which
/// `torch.save` never relies on for tensors.
struct Unpickler<'r, R> {
    r: &'r mut R,
    /// Bytes read so far from `r`, across pickles (for messages and offsets).
    pos: u64,
    /// Bytes that `r` can still deliver at most (bounds every length read from the file).
    end: u64,
    stack: Vec<Node>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Node>,
    /// Objects created or copied so far, and the most allowed (bounds memo blow-ups).
    work: u64,
    max_work: u64,
}

impl<'r, R: Read> Unpickler<'r, R> {
    /// An interpreter reading from `r`, which starts at byte `pos` of a file of `end` bytes.
    fn new(r: &'r mut R, pos: u64, end: u64) -> Self {
        Unpickler {
            r,
            pos,
            end,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            work: 0,
            max_work: 1_000_000u64.saturating_add(end.saturating_sub(pos).saturating_mul(64)),
        }
    }

    fn malformed<T>(&self, msg: impl Into<String>) -> PResult<T> {
        Err(PickleError::Malformed {
            pos: self.pos,
            msg: msg.into(),
        })
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> PResult<()> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(PickleError::Truncated { pos: self.pos })
            }
            Err(e) => Err(PickleError::Io(e)),
        }
    }

    fn u8(&mut self) -> PResult<u8> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b)?;
        Ok(b[0])
    }

    fn array<const N: usize>(&mut self) -> PResult<[u8; N]> {
        let mut b = [0u8; N];
        self.read_exact(&mut b)?;
        Ok(b)
    }

    /// `n` bytes, refusing lengths the rest of the file cannot hold before allocating them.
    fn bytes(&mut self, n: u64) -> PResult<Vec<u8>> {
        if n > self.end.saturating_sub(self.pos) {
            return Err(PickleError::Truncated { pos: self.end });
        }
        let mut buf = vec![0u8; n as usize];
        self.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn string(&mut self, n: u64) -> PResult<Object> {
        let bytes = self.bytes(n)?;
        match String::from_utf8(bytes) {
            Ok(s) => Ok(Object::Unicode(s)),
            Err(_) => self.malformed("a string is not valid UTF-8"),
        }
    }

    /// A newline-terminated line of a GLOBAL opcode.
    fn line(&mut self) -> PResult<String> {
        let mut out = Vec::new();
        loop {
            let b = self.u8()?;
            if b == b'\n' {
                break;
            }
            if out.len() >= 256 {
                return self.malformed("a GLOBAL name is longer than 256 bytes");
            }
            out.push(b);
        }
        match String::from_utf8(out) {
            Ok(s) => Ok(s),
            Err(_) => self.malformed("a GLOBAL name is not valid UTF-8"),
        }
    }

    fn charge(&mut self, cost: u64) -> PResult<()> {
        self.work = self.work.saturating_add(cost);
        if self.work > self.max_work {
            return self.malformed(
                "it copies memoised objects so often that it would grow out of proportion to \
                 the file",
            );
        }
        Ok(())
    }

    fn push(&mut self, node: Node) -> PResult<()> {
        if node.depth > MAX_DEPTH {
            return self.malformed(format!("objects nest deeper than {MAX_DEPTH} levels"));
        }
        self.charge(1)?;
        self.stack.push(node);
        Ok(())
    }

    fn push_leaf(&mut self, obj: Object) -> PResult<()> {
        self.push(Node::leaf(obj))
    }

    /// Pops the top object; it must lie above the innermost MARK.
    fn pop(&mut self, op: &str) -> PResult<Node> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.malformed(format!("{op} finds too few objects on the stack"));
        }
        match self.stack.pop() {
            Some(node) => Ok(node),
            None => self.malformed(format!("{op} finds an empty stack")),
        }
    }

    /// Pops everything above the innermost MARK, and the MARK.
    fn pop_mark(&mut self, op: &str) -> PResult<Vec<Node>> {
        match self.marks.pop() {
            Some(at) if at <= self.stack.len() => Ok(self.stack.split_off(at)),
            _ => self.malformed(format!("{op} finds no MARK")),
        }
    }

    /// The top object, for opcodes that add to it.
    fn top(&mut self, op: &str) -> PResult<&mut Node> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.malformed(format!("{op} finds no container on the stack"));
        }
        let pos = self.pos;
        self.stack.last_mut().ok_or_else(|| PickleError::Malformed {
            pos,
            msg: format!("{op} finds an empty stack"),
        })
    }

    /// A node holding `obj` made of `parts`.
    fn compound(obj: Object, parts: &[&Node]) -> Node {
        Node {
            obj,
            size: parts.iter().fold(1u64, |acc, n| acc.saturating_add(n.size)),
            depth: 1 + parts.iter().map(|n| n.depth).max().unwrap_or(0),
        }
    }

    fn push_tuple(&mut self, items: Vec<Node>) -> PResult<()> {
        let parts: Vec<&Node> = items.iter().collect();
        let mut node = Self::compound(Object::None, &parts);
        node.obj = Object::Tuple(items.into_iter().map(|n| n.obj).collect());
        self.push(node)
    }

    /// Adds `items` (objects, or key-value pairs when `pairs`) to the container on top.
    fn extend_top(&mut self, op: &str, items: Vec<Node>, pairs: bool) -> PResult<()> {
        if pairs && !items.len().is_multiple_of(2) {
            return self.malformed(format!("{op} has a key without a value"));
        }
        let pos = self.pos;
        let top = self.top(op)?;
        let size = items
            .iter()
            .fold(top.size, |acc, n| acc.saturating_add(n.size));
        let depth = items.iter().map(|n| n.depth + 1).fold(top.depth, u32::max);
        match (&mut top.obj, pairs) {
            (Object::Dict(entries), true) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    entries.push((k.obj, v.obj));
                }
            }
            (Object::List(list), false) => list.extend(items.into_iter().map(|n| n.obj)),
            _ => {
                let want = if pairs { "dict" } else { "list" };
                return Err(PickleError::Malformed {
                    pos,
                    msg: format!("{op} expects a {want} on the stack"),
                });
            }
        }
        top.size = size;
        top.depth = depth;
        if depth > MAX_DEPTH {
            return self.malformed(format!("objects nest deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }

    fn memo_put(&mut self, id: u32) -> PResult<()> {
        let node = self.top("a memo PUT")?.clone();
        self.charge(node.size)?;
        self.memo.insert(id, node);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> PResult<()> {
        let node = match self.memo.get(&id) {
            Some(node) => node.clone(),
            None => return self.malformed(format!("it reads memo entry {id}, never written")),
        };
        self.charge(node.size)?;
        self.push(node)
    }

    fn global(&mut self, module: String, name: String) -> PResult<()> {
        if !allowed_global(&module, &name) {
            return Err(PickleError::Global { module, name });
        }
        self.push_leaf(Object::Class {
            module_name: module,
            class_name: name,
        })
    }

    /// Interprets one pickle, up to and including its STOP opcode, and returns its object.
    fn load(&mut self) -> PResult<Object> {
        self.stack.clear();
        self.marks.clear();
        self.memo.clear();
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return self.malformed(format!("pickle protocol {proto} does not exist"));
                    }
                }
                0x95 => {
                    self.array::<8>()?; // FRAME: a length hint only
                }
                b'.' => {
                    let node = self.pop("STOP")?;
                    return Ok(node.obj);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop("STACK_GLOBAL")?.obj;
                    let module = self.pop("STACK_GLOBAL")?.obj;
                    match (module, name) {
                        (Object::Unicode(module), Object::Unicode(name)) => {
                            self.global(module, name)?
                        }
                        _ => return self.malformed("STACK_GLOBAL expects two strings"),
                    }
                }
                b'q' => {
                    let id = self.u8()?;
                    self.memo_put(u32::from(id))?;
                }
                b'r' => {
                    let id = u32::from_le_bytes(self.array()?);
                    self.memo_put(id)?;
                }
                0x94 => {
                    let id = u32::try_from(self.memo.len()).unwrap_or(u32::MAX);
                    self.memo_put(id)?;
                }
                b'h' => {
                    let id = self.u8()?;
                    self.memo_get(u32::from(id))?;
                }
                b'j' => {
                    let id = u32::from_le_bytes(self.array()?);
                    self.memo_get(id)?;
                }
                b'(' => self.marks.push(self.stack.len()),
                b')' => self.push_leaf(Object::Tuple(Vec::new()))?,
                b']' => self.push_leaf(Object::List(Vec::new()))?,
                b'}' => self.push_leaf(Object::Dict(Vec::new()))?,
                b'N' => self.push_leaf(Object::None)?,
                0x88 => self.push_leaf(Object::Bool(true))?,
                0x89 => self.push_leaf(Object::Bool(false))?,
                b'K' => {
                    let v = self.u8()?;
                    self.push_leaf(Object::Int(i32::from(v)))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push_leaf(Object::Int(i32::from(v)))?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push_leaf(Object::Int(v))?;
                }
                0x8a => {
                    let n = self.u8()?;
                    if n > 8 {
                        return self.malformed(format!(
                            "LONG1 holds a {n}-byte integer; at most 8 bytes are read"
                        ));
                    }
                    let bytes = self.bytes(u64::from(n))?;
                    let mut full = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    full[..bytes.len()].copy_from_slice(&bytes);
                    self.push_leaf(Object::Long(i64::from_le_bytes(full)))?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push_leaf(Object::Float(v))?;
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.array()?);
                    let s = self.string(u64::from(n))?;
                    self.push_leaf(s)?;
                }
                0x8c => {
                    let n = self.u8()?;
                    let s = self.string(u64::from(n))?;
                    self.push_leaf(s)?;
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.array()?);
                    let s = self.string(n)?;
                    self.push_leaf(s)?;
                }
                b't' => {
                    let items = self.pop_mark("TUPLE")?;
                    self.push_tuple(items)?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(opcode_name(op))?);
                    }
                    items.reverse();
                    self.push_tuple(items)?;
                }
                b'l' => {
                    let items = self.pop_mark("LIST")?;
                    self.push_leaf(Object::List(Vec::new()))?;
                    self.extend_top("LIST", items, false)?;
                }
                b'd' => {
                    let items = self.pop_mark("DICT")?;
                    self.push_leaf(Object::Dict(Vec::new()))?;
                    self.extend_top("DICT", items, true)?;
                }
                b'a' => {
                    let v = self.pop("APPEND")?;
                    self.extend_top("APPEND", vec![v], false)?;
                }
                b'e' => {
                    let items = self.pop_mark("APPENDS")?;
                    self.extend_top("APPENDS", items, false)?;
                }
                b's' => {
                    let v = self.pop("SETITEM")?;
                    let k = self.pop("SETITEM")?;
                    self.extend_top("SETITEM", vec![k, v], true)?;
                }
                b'u' => {
                    let items = self.pop_mark("SETITEMS")?;
                    self.extend_top("SETITEMS", items, true)?;
                }
                b'Q' => {
                    let id = self.pop("BINPERSID")?;
                    self.push(Node {
                        size: id.size.saturating_add(1),
                        depth: id.depth + 1,
                        obj: Object::PersistentLoad(Box::new(id.obj)),
                    })?;
                }
                b'R' | 0x81 => {
                    let name = opcode_name(op);
                    let args = self.pop(name)?;
                    let callable = self.pop(name)?;
                    let is_ordered_dict = matches!(
                        &callable.obj,
                        Object::Class { module_name, class_name }
                            if module_name == "collections" && class_name == "OrderedDict"
                    );
                    if is_ordered_dict {
                        // `OrderedDict()`: the items follow as SETITEMS.
                        match &args.obj {
                            Object::Tuple(a) if a.is_empty() => {
                                self.push_leaf(Object::Dict(Vec::new()))?
                            }
                            _ => return self.malformed("OrderedDict is called with arguments"),
                        }
                    } else {
                        let mut node = Self::compound(Object::None, &[&callable, &args]);
                        node.obj = Object::Reduce {
                            callable: Box::new(callable.obj),
                            args: Box::new(args.obj),
                        };
                        self.push(node)?;
                    }
                }
                b'b' => {
                    let state = self.pop("BUILD")?;
                    let obj = self.pop("BUILD")?;
                    if matches!(obj.obj, Object::Dict(_)) {
                        // A dict's attributes (a state dict's `_metadata`) are not its items.
                        self.push(obj)?;
                    } else {
                        let mut node = Self::compound(Object::None, &[&obj, &state]);
                        node.obj = Object::Build {
                            callable: Box::new(obj.obj),
                            args: Box::new(state.obj),
                        };
                        self.push(node)?;
                    }
                }
                other => {
                    return Err(PickleError::Malformed {
                        pos: at,
                        msg: format!(
                            "it uses pickle opcode 0x{other:02x} ({}), which metalearn's reader \
                             does not know (torch.save writes pickle protocol 2)",
                            opcode_name(other)
                        ),
                    })
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// From pickled objects to tensor descriptions.

/// Where a tensor's values lie: its storage and its view of it.
#[derive(Debug, Clone)]
struct TensorRef {
    key: String,
    dtype: DType,
    /// Elements in the whole storage.
    storage_numel: u64,
    /// The view's first element, in elements.
    offset: u64,
    size: Vec<usize>,
    stride: Vec<usize>,
}

fn as_str(o: &Object) -> Option<&str> {
    match o {
        Object::Unicode(s) => Some(s),
        _ => None,
    }
}

fn as_u64(o: &Object) -> Option<u64> {
    match o {
        Object::Int(v) => u64::try_from(*v).ok(),
        Object::Long(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

fn as_tuple(o: &Object) -> Option<&[Object]> {
    match o {
        Object::Tuple(v) => Some(v),
        _ => None,
    }
}

fn as_class(o: &Object) -> Option<(&str, &str)> {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => Some((module_name, class_name)),
        _ => None,
    }
}

/// A tuple of non-negative integers (a size or a stride).
fn as_dims(o: &Object, what: &str) -> std::result::Result<Vec<usize>, String> {
    let items = as_tuple(o).ok_or_else(|| format!("its {what} is not a tuple"))?;
    items
        .iter()
        .map(|d| {
            as_u64(d)
                .and_then(|d| usize::try_from(d).ok())
                .ok_or_else(|| format!("its {what} holds {d:?}, not a non-negative integer"))
        })
        .collect()
}

/// The dtype of a torch storage class (`torch.FloatStorage`, ...).
fn storage_dtype(name: &str) -> std::result::Result<DType, String> {
    Ok(match name {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "ByteStorage" | "BoolStorage" => DType::U8,
        other => {
            return Err(format!(
                "its storage is a `torch.{other}`, a type metalearn does not read (it reads \
                 float32, float64, float16, bfloat16, int64, int32, int16, uint8 and bool)"
            ))
        }
    })
}

/// A storage reference: the persistent id `('storage', torch.<T>Storage, key, location, numel
/// [, view_metadata])` that torch pickles for each storage. Returns the key, dtype, element
/// count and the element offset of a legacy storage view.
fn storage_ref(pid: &Object) -> std::result::Result<(String, DType, u64, u64), String> {
    let parts = as_tuple(pid).ok_or("its storage reference is not a tuple")?;
    if parts.len() < 5 || as_str(&parts[0]) != Some("storage") {
        return Err(format!("its storage reference {pid:?} is not torch's"));
    }
    let class = as_class(&parts[1]).ok_or("its storage type is not a class")?;
    let dtype = storage_dtype(class.1)?;
    let key = as_str(&parts[2]).ok_or("its storage key is not a string")?;
    let numel = as_u64(&parts[4]).ok_or("its storage size is not a non-negative integer")?;
    // Legacy views of a storage: (view key, offset in elements, size in elements).
    let view_offset = match parts.get(5) {
        None | Some(Object::None) => 0,
        Some(view) => as_tuple(view)
            .and_then(|v| v.get(1))
            .and_then(as_u64)
            .ok_or_else(|| format!("its storage view {view:?} is not understood"))?,
    };
    Ok((key.to_string(), dtype, numel, view_offset))
}

/// The arguments of `torch._utils._rebuild_tensor_v2`: (storage, storage offset, size, stride,
/// requires_grad, backward hooks[, metadata]).
fn rebuild_tensor_v2(args: Option<&[Object]>) -> std::result::Result<TensorRef, String> {
    let a = args.ok_or("its arguments are not a tuple")?;
    if a.len() < 4 {
        return Err("it has fewer than 4 arguments".to_string());
    }
    let pid = match &a[0] {
        Object::PersistentLoad(pid) => pid,
        other => return Err(format!("its storage is {other:?}, not a reference")),
    };
    let (key, dtype, storage_numel, view_offset) = storage_ref(pid)?;
    let offset = as_u64(&a[1]).ok_or("its storage offset is not an integer")?;
    let size = as_dims(&a[2], "size")?;
    let stride = as_dims(&a[3], "stride")?;
    if size.len() != stride.len() {
        return Err(format!(
            "its size has {} dimensions but its stride {}",
            size.len(),
            stride.len()
        ));
    }
    Ok(TensorRef {
        key,
        dtype,
        storage_numel,
        offset: offset.saturating_add(view_offset),
        size,
        stride,
    })
}

/// The tensor that calling `callable` with `args` would rebuild, if it is a tensor rebuilder;
/// `None` for anything else.
fn rebuilt_tensor(
    callable: &Object,
    args: &Object,
) -> Option<std::result::Result<TensorRef, String>> {
    let args_list = as_tuple(args);
    match as_class(callable)? {
        ("torch._utils", "_rebuild_tensor_v2") => Some(rebuild_tensor_v2(args_list)),
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            match args_list.and_then(|a| a.first()) {
                Some(Object::Reduce { callable, args }) => rebuilt_tensor(callable, args)
                    .or_else(|| Some(Err("the parameter's data is not a tensor".to_string()))),
                _ => Some(Err("the parameter's data is not a tensor".to_string())),
            }
        }
        ("torch._tensor", "_rebuild_from_type_v2") => match args_list {
            // (function, type, arguments, state)
            Some([func, _, inner, ..]) => rebuilt_tensor(func, inner),
            _ => Some(Err(
                "_rebuild_from_type_v2 has unexpected arguments".to_string()
            )),
        },
        _ => None,
    }
}

/// The tensor an object describes, if it is one.
fn tensor_of(o: &Object) -> Option<std::result::Result<TensorRef, String>> {
    match o {
        Object::Reduce { callable, args } => rebuilt_tensor(callable, args),
        _ => None,
    }
}

/// The tensors among a dict's entries, in order, skipping entries that are not tensors.
fn tensor_entries(src: &Source, items: &[(Object, Object)]) -> Result<Vec<(String, TensorRef)>> {
    let mut out = Vec::new();
    for (k, v) in items {
        let Some(name) = as_str(k) else { continue };
        match tensor_of(v) {
            None => {}
            Some(Ok(t)) => out.push((name.to_string(), t)),
            Some(Err(msg)) => return Err(src.err(format!("has a tensor `{name}` that {msg}"))),
        }
    }
    Ok(out)
}

/// A short description of an object's kind, for messages.
fn kind(o: &Object) -> String {
    match o {
        Object::Dict(_) => "dict".into(),
        Object::List(_) => "list".into(),
        Object::Tuple(_) => "tuple".into(),
        Object::Reduce { callable, .. } | Object::Build { callable, .. } => {
            match as_class(callable) {
                Some((m, _)) if m.starts_with("torch._") => "single tensor".into(),
                Some((m, c)) => format!("`{m}.{c}` object"),
                None => "Python object".into(),
            }
        }
        Object::Unicode(_) => "string".into(),
        Object::Int(_) | Object::Long(_) => "number".into(),
        Object::Float(_) => "number".into(),
        _ => "Python value".into(),
    }
}

/// The state dict's tensors: the file's top-level dict, or a checkpoint's `state_dict`,
/// `model_state_dict` or `model` entry.
fn state_dict(src: &Source, top: &Object) -> Result<Vec<(String, TensorRef)>> {
    let Object::Dict(items) = top else {
        return Err(src.err(format!(
            "holds a {} rather than a state dict (a dict of tensors)",
            kind(top)
        )));
    };
    let tensors = tensor_entries(src, items)?;
    if !tensors.is_empty() {
        return Ok(tensors);
    }
    for wanted in ["state_dict", "model_state_dict", "model"] {
        if let Some((_, Object::Dict(inner))) =
            items.iter().find(|(k, _)| as_str(k) == Some(wanted))
        {
            let tensors = tensor_entries(src, inner)?;
            if !tensors.is_empty() {
                return Ok(tensors);
            }
        }
    }
    let keys: Vec<String> = items
        .iter()
        .take(20)
        .map(|(k, _)| match as_str(k) {
            Some(s) => format!("`{s}`"),
            None => format!("{k:?}"),
        })
        .collect();
    Err(src.err(format!(
        "holds no tensors, neither at its top level nor under `state_dict`, `model_state_dict` \
         or `model` (its keys: {})",
        if keys.is_empty() {
            "none".to_string()
        } else {
            keys.join(", ")
        }
    )))
}

/// Every storage the object refers to, anywhere: key to (dtype, element count).
fn all_storages(o: &Object, out: &mut HashMap<String, (DType, u64)>) {
    match o {
        Object::PersistentLoad(pid) => {
            if let Ok((key, dtype, numel, _)) = storage_ref(pid) {
                out.entry(key).or_insert((dtype, numel));
            }
        }
        Object::Tuple(v) | Object::List(v) => v.iter().for_each(|x| all_storages(x, out)),
        Object::Dict(v) => v.iter().for_each(|(k, x)| {
            all_storages(k, out);
            all_storages(x, out);
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            all_storages(callable, out);
            all_storages(args, out);
        }
        _ => {}
    }
}

/// Bytes a storage of `numel` elements of `dtype` holds, if that fits in memory at all.
fn storage_bytes(numel: u64, dtype: DType) -> Option<u64> {
    numel
        .checked_mul(dtype.size_in_bytes() as u64)
        .filter(|&b| usize::try_from(b).is_ok())
}

/// The tensor a view describes, copied out of its storage's bytes.
fn materialise(src: &Source, name: &str, t: &TensorRef, storage: &[u8]) -> Result<Tensor> {
    let fail = |msg: String| src.err(format!("has a tensor `{name}` that {msg}"));
    let elem = t.dtype.size_in_bytes();
    let numel = t
        .size
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| fail(format!("has an impossible size {:?}", t.size)))?;
    let mut out = Vec::new();
    if numel > 0 {
        let overflow = || fail("reaches past any possible storage".to_string());
        let offset = usize::try_from(t.offset).map_err(|_| overflow())?;
        let mut last = offset;
        for (&d, &s) in t.size.iter().zip(&t.stride) {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .ok_or_else(overflow)?;
        }
        let needed = last
            .checked_add(1)
            .and_then(|n| n.checked_mul(elem))
            .ok_or_else(overflow)?;
        if needed > storage.len() {
            return Err(fail(format!(
                "reads {needed} bytes of its storage `{}`, which holds only {}",
                t.key,
                storage.len()
            )));
        }
        let out_bytes = numel.checked_mul(elem).ok_or_else(overflow)?;
        if out_bytes > storage.len() && out_bytes > 1 << 30 {
            return Err(fail(format!(
                "repeats its {}-byte storage into {out_bytes} bytes (an expanded view); metalearn \
                 does not read such views",
                storage.len()
            )));
        }
        out.reserve_exact(out_bytes);
        // Row-major strides of the contiguous layout, to copy contiguous views in one piece.
        let mut contiguous = true;
        let mut expect = 1usize;
        for (&d, &s) in t.size.iter().zip(&t.stride).rev() {
            if d != 1 && s != expect {
                contiguous = false;
            }
            expect = expect.saturating_mul(d);
        }
        if contiguous {
            out.extend_from_slice(&storage[offset * elem..offset * elem + out_bytes]);
        } else {
            // Walk the view's indices like an odometer, keeping the storage index in step.
            let rank = t.size.len();
            let mut index = vec![0usize; rank];
            let mut at = offset;
            for _ in 0..numel {
                out.extend_from_slice(&storage[at * elem..(at + 1) * elem]);
                // Wrapping arithmetic: the walk may step past the view's last element (and a
                // size-1 dimension may carry any stride) but every index it reads is in bounds.
                for dim in (0..rank).rev() {
                    index[dim] += 1;
                    at = at.wrapping_add(t.stride[dim]);
                    if index[dim] < t.size[dim] {
                        break;
                    }
                    at = at.wrapping_sub(t.stride[dim].wrapping_mul(t.size[dim]));
                    index[dim] = 0;
                }
            }
        }
    }
    Tensor::from_raw_buffer(&out, t.dtype, &t.size, &Device::Cpu).map_err(|e| fail(e.to_string()))
}

/// Turns the tensor descriptions into tensors, given each storage's bytes.
fn build(
    src: &Source,
    tensors: Vec<(String, TensorRef)>,
    storages: &HashMap<String, Vec<u8>>,
) -> Result<Vec<(String, Tensor)>> {
    tensors
        .into_iter()
        .map(|(name, t)| {
            let bytes = storages.get(&t.key).ok_or_else(|| {
                src.err(format!(
                    "has a tensor `{name}` whose storage `{}` is missing",
                    t.key
                ))
            })?;
            let tensor = materialise(src, &name, &t, bytes)?;
            Ok((name, tensor))
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// The two layouts.

/// The zip layout: `<name>/data.pkl` and `<name>/data/<key>`.
fn read_zip(src: &Source, file: File) -> Result<Vec<(String, Tensor)>> {
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        src.err(format!(
            "starts like a zip archive but cannot be opened as one ({e}): the file is \
             truncated or damaged"
        ))
    })?;
    let pickle_name = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| {
            src.err("is a zip archive without a `data.pkl`, so not a file written by torch.save")
        })?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    let zip_err = |what: &str, e: zip::result::ZipError| {
        src.err(format!(
            "has an unreadable `{what}` in its zip archive ({e}): the file is truncated or \
             damaged"
        ))
    };

    if let Ok(entry) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        entry
            .take(64)
            .read_to_string(&mut order)
            .map_err(|e| src.io(e))?;
        if order.trim() != "little" {
            return Err(src.err(format!(
                "stores its tensors in `{}` byte order; metalearn reads little-endian files only",
                order.trim()
            )));
        }
    }

    let top = {
        let entry = zip
            .by_name(&pickle_name)
            .map_err(|e| zip_err(&pickle_name, e))?;
        let size = entry.size();
        let mut reader = BufReader::new(entry);
        Unpickler::new(&mut reader, 0, size)
            .load()
            .map_err(|e| src.pickle_err(e, &format!("its `{pickle_name}`")))?
    };
    let tensors = state_dict(src, &top)?;
    drop(top);

    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for (name, t) in &tensors {
        if storages.contains_key(&t.key) {
            continue;
        }
        let entry_name = format!("{prefix}data/{}", t.key);
        let need = storage_bytes(t.storage_numel, t.dtype).ok_or_else(|| {
            src.err(format!(
                "has a tensor `{name}` whose storage claims {} elements, more than memory holds",
                t.storage_numel
            ))
        })?;
        let entry = zip
            .by_name(&entry_name)
            .map_err(|e| zip_err(&entry_name, e))?;
        let have = entry.size();
        if have < need {
            return Err(src.err(format!(
                "is truncated or damaged: `{entry_name}` (the storage of `{name}`) holds {have} \
                 bytes but {need} bytes were expected"
            )));
        }
        let mut bytes = Vec::new();
        entry
            .take(need)
            .read_to_end(&mut bytes)
            .map_err(|e| src.err(format!("has an unreadable `{entry_name}` ({e})")))?;
        if (bytes.len() as u64) < need {
            return Err(src.err(format!(
                "is truncated: `{entry_name}` (the storage of `{name}`) ends after {} bytes but \
                 {need} bytes were expected",
                bytes.len()
            )));
        }
        storages.insert(t.key.clone(), bytes);
    }
    build(src, tensors, &storages)
}

/// The legacy layout: five pickles, then the storages in the order of the last pickle.
fn read_legacy(src: &Source, file: File, len: u64) -> Result<Vec<(String, Tensor)>> {
    let mut reader = BufReader::new(file);
    // The magic number, checked byte by byte by the caller: PROTO n, LONG1 10 <bytes>, STOP.
    let mut magic = [0u8; 15];
    reader.read_exact(&mut magic).map_err(|e| src.io(e))?;
    let mut pos = magic.len() as u64;

    let next = |reader: &mut BufReader<File>, pos: &mut u64, what: &str| {
        let mut un = Unpickler::new(reader, *pos, len);
        let obj = un.load().map_err(|e| src.pickle_err(e, what));
        *pos = un.pos;
        obj
    };
    let version = next(&mut reader, &mut pos, "its version pickle")?;
    if as_u64(&version) != Some(LEGACY_PROTOCOL_VERSION as u64) {
        return Err(src.err(format!(
            "is a legacy PyTorch file of format version {version:?}; metalearn reads version \
             {LEGACY_PROTOCOL_VERSION}"
        )));
    }
    let sys_info = next(&mut reader, &mut pos, "its machine-description pickle")?;
    if let Object::Dict(items) = &sys_info {
        let little = items
            .iter()
            .find(|(k, _)| as_str(k) == Some("little_endian"))
            .map(|(_, v)| v);
        if matches!(little, Some(Object::Bool(false))) {
            return Err(src.err(
                "was written on a big-endian machine; metalearn reads little-endian files only",
            ));
        }
    }
    let top = next(&mut reader, &mut pos, "its main pickle")?;
    let keys_obj = next(&mut reader, &mut pos, "its list of storage keys")?;
    let keys: Vec<String> = match &keys_obj {
        Object::List(keys) => keys
            .iter()
            .map(|k| as_str(k).map(str::to_string))
            .collect::<Option<_>>(),
        _ => None,
    }
    .ok_or_else(|| src.err("has a list of storage keys that is not a list of strings"))?;

    let tensors = state_dict(src, &top)?;
    let mut sizes = HashMap::new();
    all_storages(&top, &mut sizes);
    drop(top);

    // What the storages need, to report a truncated file before reading it.
    let mut expected = pos;
    let mut plan = Vec::with_capacity(keys.len());
    for key in &keys {
        let (dtype, numel) = *sizes.get(key).ok_or_else(|| {
            src.err(format!(
                "lists a storage `{key}` that none of its objects refers to, so its size is \
                 unknown"
            ))
        })?;
        let bytes = storage_bytes(numel, dtype).ok_or_else(|| {
            src.err(format!(
                "has a storage `{key}` of {numel} elements, more than memory holds"
            ))
        })?;
        expected = expected.saturating_add(8).saturating_add(bytes);
        plan.push((key, numel, bytes));
    }
    if len < expected {
        return Err(src.err(format!(
            "is truncated: its {} storages need {expected} bytes in all, but the file has only \
             {len} ({} bytes missing)",
            keys.len(),
            expected - len
        )));
    }

    let wanted: std::collections::HashSet<&str> =
        tensors.iter().map(|(_, t)| t.key.as_str()).collect();
    let mut storages = HashMap::new();
    for (key, numel, bytes) in plan {
        let mut count = [0u8; 8];
        reader.read_exact(&mut count).map_err(|e| src.io(e))?;
        let count = u64::from_le_bytes(count);
        if count != numel {
            return Err(src.err(format!(
                "has a storage `{key}` whose data holds {count} elements where its tensors \
                 refer to {numel}: the file is damaged"
            )));
        }
        let mut data = Vec::new();
        let mut skip = std::io::sink();
        let sink: &mut dyn std::io::Write = if wanted.contains(key.as_str()) {
            &mut data
        } else {
            &mut skip
        };
        let copied = std::io::copy(&mut (&mut reader).take(bytes), sink).map_err(|e| src.io(e))?;
        if copied < bytes {
            return Err(src.err(format!(
                "is truncated: storage `{key}` needs {bytes} bytes but only {copied} remain"
            )));
        }
        if wanted.contains(key.as_str()) {
            storages.insert(key.clone(), data);
        }
    }
    build(src, tensors, &storages)
}
