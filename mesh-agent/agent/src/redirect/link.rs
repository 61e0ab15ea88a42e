//! Replacing the program a pinned link runs, atomically. The kernel's
//! `BPF_LINK_UPDATE` swaps a link's program in place, so a restarted agent's
//! programs take over with no moment at which nothing is attached and pods'
//! connects would pass unredirected. aya offers link updates only for XDP
//! and TC links, hence these two raw `bpf(2)` calls.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// `enum bpf_cmd` of the kernel UAPI (`linux/bpf.h`).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// The `bpf_attr` prefix `BPF_OBJ_GET` reads.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The `bpf_attr` prefix `BPF_LINK_UPDATE` reads.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
/// `attr` must be the attribute layout the kernel expects for `cmd`, and any
/// pointer or descriptor in it valid for the duration of the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for `attr`; the kernel reads at most its size.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>() as u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Opens the BPF object pinned at `path` (a link, for us).
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let pathname = CString::new(path.as_os_str().as_bytes())?;
    let attr = ObjGetAttr {
        pathname: pathname.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: a BPF_OBJ_GET attribute whose path outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &attr)? };
    // SAFETY: the kernel returned a new descriptor, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes `link` run `program` from now on.
pub fn update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: a BPF_LINK_UPDATE attribute; both descriptors are borrowed, so
    // open for the duration of the call.
    unsafe { bpf(BPF_LINK_UPDATE, &attr) }.map(drop)
}
