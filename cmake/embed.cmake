# Turns a binary or text file into a C source defining
#   const unsigned char SYMBOL[]; const size_t SYMBOL_len;
# Usage: cmake -DIN=file -DOUT=file.c -DSYMBOL=name -P embed.cmake
file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" hexlen)
math(EXPR nbytes "${hexlen} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," body "${hex}")
string(REGEX REPLACE "((0x[0-9a-f][0-9a-f],){16})" "\\1\n" body "${body}")
file(WRITE "${OUT}" "/* generated from ${IN}; do not edit */\n#include <stddef.h>\n"
     "const unsigned char ${SYMBOL}[] = {\n${body}0x00};\n"
     "const size_t ${SYMBOL}_len = ${nbytes};\n")
